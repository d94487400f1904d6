#!/usr/bin/env python
"""Draw the demo concept (a circle striped purple and orange, base class word `circle`) into a folder of photos."""
import argparse

from ldm.toy.scenes import write_concept_folder
from ldm.util import HelpFormatter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="data/toy_concept", help="folder to write")
    p.add_argument("--n", type=int, default=5, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="layout seed")
    opt = p.parse_args(argv)
    paths = write_concept_folder(opt.out, opt.n, opt.size, opt.seed)
    print(f"Wrote {len(paths)} images to {opt.out}")


if __name__ == "__main__":
    main()
