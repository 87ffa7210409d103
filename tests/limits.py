"""How long a test waits for a subprocess before calling it hung.

One limit for every subprocess a test starts: far above any honest run on a busy 2-core machine,
so a test fails for a hang, never for being slow. A test that waits says for what in its message."""
HANG_S = 30 * 60
