"""Two-crop input pipelines of fastmoco (installed as `fastmoco.pipelines`)."""
