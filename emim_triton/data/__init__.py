"""Video datasets: annotation formats, readers (PyAV, frame folders), clip sampling and transforms.

    annotations.py  SSv1/SSv2/Kinetics/Diving48/generic annotation files -> VideoRecord lists
    readers.py      VideoFileReader (PyAV) and FrameFolderReader (Pillow): the chosen frames of one video
    frame_sampling.py  segment (TSN) and dense frame indices, random in training, deterministic test views
    transforms.py   clip transforms on (C, T, H, W) tensors (random resized crop, flip, normalise, erase)
    dataset.py      ClipDataset: records -> clips, unreadable videos skipped and reported
    sharded_sampler.py ShardedSampler: per-rank sample order, a function of (seed, epoch), resumable mid-epoch
    seeding.py      seeds derived from (seed, epoch, index, ...)
    build.py        the dataset formats' conventions in one table; DataOptions -> datasets
    motion.py       the generated motion-sensitive dataset of the main job (SSv2 layout, real WebM files)
"""
