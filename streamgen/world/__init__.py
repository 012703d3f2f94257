"""The procedural ground-truth world: ``render`` (World, raycaster), ``scene`` (looks,
captions), ``policies``, ``episodes`` (generate_clip, WorldSession), ``data`` (shards,
ClipDataset, VideoFolderDataset, MP4 I/O) and ``cli`` (``streamgen world``)."""
