"""FedCT's SuperNode process: Flower's ``flower-supernode``, with Flower's transport waits paced
for a few hospitals rather than a fleet of phones (common/flower_pacing.py).

    python -m fedct.client.supernode [flower-supernode's options]

``fedct client`` starts this in place of the ``flower-supernode`` executable; its options,
behaviour and exit codes are Flower's.
"""

from __future__ import annotations

from fedct.common.flower_pacing import pace_object_pulls, pace_supernode


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    pace_supernode()
    pace_object_pulls()
    flower_supernode()


if __name__ == "__main__":
    main()
