"""The shard format: the one contract between stage one (synth) and stage two (distill).

A dataset folder holds
  shard-000000.tar, shard-000001.tar, ...   WebDataset tar shards
  manifest.json                             what made them and what they hold (below)
  _info.json                                timm's WebDataset split info (num_samples, filenames, shard_lengths);
                                            timm reads png and jpg shards, not npy ones (timm_readable in
                                            manifest.json and _info.json; no splits there for npy)
  val/                                      optional: a small held-out synthetic split, itself a complete dataset
                                            folder (shards, manifest.json, _info.json) of the same teacher and
                                            method, drawn with other seeds (no image in common with the training
                                            shards); its manifest's config is the training one plus
                                            "split": "val" and "val_images". `distill train --val-shards` measures
                                            the student's agreement with the teacher on it

Each sample in a shard is a group of tar members sharing a key (no dots in keys):
  sample-00001234.png | .jpg | .npy   the image, uint8 (H, W, C); PNG by default (lossless),
                                      JPEG (smaller, lossy) or a raw uint8 .npy array (fastest decode)
  sample-00001234.cls                 the target class, ASCII integer
  sample-00001234.logits.npy          the teacher's logits for exactly this stored image, float16 .npy
                                      (computed on the decoded images batched as a reader batches them)
  sample-00001234.json                small metadata (generator index, seed, resolution, ...)
No pickle anywhere: arrays are read with allow_pickle=False, JSON with json.loads.

Tar bytes are deterministic (fixed member order, mtime 0, uid/gid 0, no user names), so the same
samples always give the same shard bytes and the same sha256.

The package's parts: codec.py (a sample's members), tar.py (a shard's tar file), manifest.py (manifest.json,
_info.json, the folder's layout), schema.py (the manifest's strict checks), verify.py (a folder against its
manifest). Import the names from `dfkd.common.shards`.
"""

from . import schema
from .codec import (IMAGE_FORMATS, JPEG_QUALITY, LOSSY_FORMATS, MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES,
                    TIMM_READABLE_FORMATS, Sample, ShardFormatError, decode_image, decode_sample, encode_image,
                    encode_images, encode_sample, sample_key)
from .tar import (FIELD_MAX_BYTES, KEY_PATTERN, ShardFile, ShardRecord, check_member, encode_segment,
                  end_of_archive, group_samples, iter_raw_samples, iter_tar_members, read_shard, shard_name,
                  tar_member, write_shard)
from .manifest import (FORMAT, FORMAT_VERSION, INFO_NAME, MANIFEST_NAME, MAX_MANIFEST_BYTES, VAL_SPLIT, Manifest,
                       TeacherRecord, build_manifest, held_out_folder, info_json, manifest_path, read_held_out,
                       read_manifest, read_remote_manifest, shard_paths, validate_manifest, write_manifest)
from .verify import (CHECK_LEVELS, ShardContent, check_shard_content, check_shard_file, check_shard_files,
                     dataset_warnings, held_out_mismatch, verify_dataset)

__all__ = ["CHECK_LEVELS", "FIELD_MAX_BYTES", "FORMAT", "FORMAT_VERSION", "IMAGE_FORMATS", "INFO_NAME",
           "JPEG_QUALITY", "KEY_PATTERN", "LOSSY_FORMATS", "MANIFEST_NAME", "MAX_IMAGE_PIXELS",
           "MAX_MANIFEST_BYTES", "MAX_MEMBER_BYTES", "TIMM_READABLE_FORMATS", "VAL_SPLIT", "Manifest", "Sample",
           "ShardContent", "ShardFile", "ShardFormatError", "ShardRecord", "TeacherRecord", "build_manifest",
           "check_member", "check_shard_content", "check_shard_file", "check_shard_files", "dataset_warnings",
           "decode_image", "decode_sample", "encode_image", "encode_images", "encode_sample", "encode_segment",
           "end_of_archive", "group_samples", "held_out_folder", "held_out_mismatch", "info_json", "iter_raw_samples",
           "iter_tar_members", "manifest_path", "read_held_out", "read_manifest", "read_remote_manifest", "read_shard", "sample_key",
           "schema", "shard_name", "shard_paths", "tar_member", "validate_manifest", "verify_dataset",
           "write_manifest", "write_shard"]
