"""How often the teacher agrees with the requested class on a shard folder, per native resolution: on the stored
view (the stored logits) and on the native view (`distill train --teacher-view native`'s: the stored image
area-downsampled to the resolution its metadata records). The README's MUSE native-view numbers come from here.

    python pipelines/teacher_agreement.py <shards> <teacher checkpoint>
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import torch

from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.common.shards import read_manifest, read_shard
from dfkd.distill.nets import native_view_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards")
    parser.add_argument("weights", help="the teacher checkpoint the shards were made with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = read_manifest(args.shards)
    teacher = create_model(manifest.teacher["arch"], weights=args.weights).eval()
    spec = teacher.input_spec
    counts = collections.defaultdict(lambda: np.zeros(3, dtype=np.int64))   # resolution -> images, stored, native
    for record in manifest.shards:
        by_size = collections.defaultdict(list)
        for sample in read_shard(Path(args.shards) / record.name):
            by_size[sample.meta.get("resolution") or spec.size].append(sample)
        for size, group in by_size.items():
            x = torch.from_numpy(np.stack([s.image for s in group])).permute(0, 3, 1, 2).float() / 255
            labels = torch.tensor([s.label for s in group])
            stored = torch.from_numpy(np.stack([s.logits for s in group]).astype(np.float32)).argmax(1)
            with torch.no_grad():   # exactly distill train --teacher-view native's view (no mixup here)
                n = len(group)
                native = native_view_logits(teacher, spec, x, torch.full((n,), size), torch.arange(n)).argmax(1)
            counts[size] += [len(group), (stored == labels).sum().item(), (native == labels).sum().item()]
    print("| native px | images | agrees, stored view | agrees, native view |\n|---|---|---|---|")
    for size, (n, stored, native) in [*sorted(counts.items()), ("all", sum(counts.values()))]:
        print(f"| {size} | {n} | {100 * stored / n:.1f}% | {100 * native / n:.1f}% |")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
