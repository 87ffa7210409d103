"""What the pretraining learned: features of a frozen backbone, weighted kNN, linear probes, export.

    features.py  class-token features of a labelled split, every rank a shard, gathered
    knn.py       DINO's weighted kNN (cosine, exp(sim / T) votes), chunked, top-1/top-5
    linear.py    MoCo v3's linear protocol and a fast probe on cached features
    weights.py   checkpoints of any ZeRO stage, official MoCo v3 files, timm safetensors
    monitor.py   the kNN monitor of a training run (config section `eval`): accuracy, neighbours, attention
    cli.py       fastmoco-knn, fastmoco-linear, fastmoco-export
    attention.py the last block's class-token attention maps, fastmoco-attention
    report.py    a run's self-contained HTML report, fastmoco-report
    figures.py   matplotlib figures on an Agg canvas, to PNG or an array
"""
