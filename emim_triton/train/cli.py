"""``emim-train`` / ``python -m emim_triton.train``: parse the configuration, then train or test.

Examples:
    emim-train --config ssv2_s16 --data-root /data/ssv2/videos --train-list ... --run-dir runs/ssv2_s16
    torchrun --nproc_per_node 8 -m emim_triton.train --config ssv2_s16 --data-root ... --run-dir ...
    emim-train --config ssv2_s16 --data-root ... --run-dir runs/ssv2_s16 --test --test-clips 2 --test-crops 3
"""

from __future__ import annotations

import sys

from emim_triton.data.annotations import AnnotationError
from emim_triton.data.build import DatasetError

from .checkpoint import CheckpointError
from .config import ConfigError, parse_config
from .distributed import cleanup, init_distributed
from .setup import resolve
from .trainer import Stopped, Trainer


def main(argv: list[str] | None = None) -> int:
    trainer = None
    try:
        cfg, _ = parse_config(argv)
        dist = init_distributed(cfg.device)
        cfg = resolve(cfg, dist)
        trainer = Trainer(cfg, dist)
        if cfg.test:
            trainer.test()
        else:
            trainer.fit()
        return 0
    except Stopped as stop:
        return stop.exit_code
    # what the user can fix gets a message, not a traceback
    except ConfigError as error:  # the options, and what only the run directory shows (a lock, --test's weights)
        print(f"emim-train: configuration error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"emim-train: checkpoint error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, AnnotationError) as error:  # wrong paths or files
        print(f"emim-train: dataset error: {error}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()  # loader workers down before interpreter exit (see Trainer.close)
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
