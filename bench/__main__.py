"""`make bench`: every benchmark, each printing its figures."""

from __future__ import annotations

from bench import watch_fanout


def main() -> None:
    watch_fanout.main([])


if __name__ == "__main__":
    main()
