"""Cleans a corpus: language id, quality rules, exact dedup, near dedup; writes JSONL shards.

  python -m transformer_jax.clean --corpus='web/**/*.jsonl' --format=jsonl --out=runs/clean \\
      [--text_field=text] [--languages=en,de] [--min_language_score=0.65] \\
      [--dedup=exact,near] [--near_threshold=0.8] [--quality=gopher|c4|gopher,c4|none] \\
      [--workers=N]

--corpus is "stdlib" or a glob of files (quote it; gs://BUCKET/... too); --format text (a document
per file), lines (a document per line) or jsonl (a document per line, text in --text_field). OUT
gets the kept documents as part-NNNNN.jsonl shards ({"id", "text", "language", "language_score"}:
train on them with data.corpus=OUT/*.jsonl data.format=jsonl; the kept pieces of a document over 1
MiB are one record, so training reads it as one document), report.md with a plot per filter, and
removed/REASON.jsonl with the first --samples documents each stage removed (and why). Stages run in
the order language, quality, exact dedup, near dedup, and a document is counted by the first that
removes it; dedup keys on the text as written (after C4's line removal; a document over 1 MiB
whole) and keeps the first copy that is written (a copy of a removed document is no duplicate).
--languages=all tags languages without removing any, none skips the stage; --dedup=none and
--quality=none turn those off. Every Gopher threshold is a flag of its own name (e.g.
--min_words=50, --max_duplicate_10gram=0.1), C4's are --c4_NAME; both rule sets are English
ones (Gopher's stop words are "the", "of", ...: --min_stop_words=0 for other languages).
--workers runs the per-document work on that many
processes; the output is the same for any number. An OUT that holds an earlier clean's output
(report.md, shards, removed/ samples or plots of its stages) is refused without --overwrite, a
training workdir always; other files in OUT are never touched. The run writes in OUT/.clean-run/
and replaces the earlier output only once it is complete (a failed or killed run leaves that
readable; an error, Ctrl-C, SIGTERM or SIGHUP removes OUT/.clean-run, and OUT if the run made
it; a signal's exit status is 128 + its number; a SIGTERM or SIGHUP during the final move waits
for it); while the files move into place OUT holds clean.unfinished, and data.corpus refuses a
folder that holds it (a run killed then: re-run clean, no --overwrite needed). A gs:// OUT is
written in a local temporary folder (TMPDIR needs room for the output), then uploaded the same
way: the marker, the earlier output removed, the new shards uploaded and renamed into place,
report.md last, the marker removed. A corpus of compressed files only (.gz, .zst, ...) is
refused: they are not read. Streams: memory holds a few
batches per worker, the exact-dedup digests and the LSH index, whatever the corpus size.
The last line printed is one JSON object: documents_in, documents_out (pieces of long documents
count one each), records_out (lines written), removed (exact_duplicate,
near_duplicate, language, quality), seconds, throughput and bad-input counts. Bad flags or a
glob matching nothing print one line and exit with status 2.
"""

import contextlib
import json
import os
import signal
import sys

if __name__ == "__main__":
  # The stages' small numpy products are slower with OpenBLAS threads waiting on busy cores, and
  # --workers already uses the cores. OpenBLAS reads this once, when numpy loads (just below).
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import transformer_jax
from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.data import clean as clean_lib
from transformer_jax.data.clean import output
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = {  # name -> default (its type is the flag's)
    "corpus": "",  # "stdlib" or a glob of files
    "format": "text",  # text | lines | jsonl
    "text_field": "text",  # the JSONL field holding the text
    "out": "",  # the output directory
    "workers": 1,  # processes for the per-document stages
    "samples": 50,  # removed documents kept per reason in OUT/removed/
    "shard_mb": 256.0,  # output shard size
    "plots": True,  # draw OUT/plots/*.png for report.md
    "overwrite": False,  # replace an earlier clean's output in OUT (else refused)
    **clean_lib.FLAGS,
}


def _check_out(out: str, overwrite: bool) -> None:
  """OUT is new, holds no earlier clean's output (its report, shards, samples or plots: replaced
  only with --overwrite; other files are never touched), or an unfinished run's; never a
  training workdir."""
  cli.not_a_workdir("out", out)
  earlier = output.earlier(out, clean_lib.STAGES)
  if earlier and not overwrite:
    raise ConfigError(f"--out={out} holds an earlier clean's output ({earlier[0]}, "
                      f"{len(earlier)} files in all): choose another --out, or --overwrite to "
                      f"replace it")


class _Stopped(BaseException):  # (not an Exception: nothing on the way may take it for an error)
  pass


@contextlib.contextmanager
def _stopped_by_signals(out: str):
  """SIGTERM and SIGHUP (a kill, a closed terminal) stop the run as an error would: its staging
  folder (OUT/.clean-run, or a gs:// OUT's local temporary one), as large as the output, is
  removed and OUT is as it was. They used to end the process at once and leave it behind (a
  kill -9 still does; the next run into OUT clears it). One that comes while the output moves
  into place (output.MOVING) waits for the move to end: stopped halfway, OUT would hold neither
  output. After a SIGHUP the output goes to /dev/null; a second signal is ignored."""
  late = []

  def stop(signum, frame):
    if signum == signal.SIGHUP:
      transformer_jax.hung_up()
    for s in old:
      signal.signal(s, signal.SIG_IGN)
    if output.MOVING.is_set():
      late.append(signum)
      return
    raise _Stopped(signum)
  old = {s: signal.signal(s, stop)
         for s in transformer_jax.stop_signals(signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  except _Stopped as e:
    name = signal.Signals(e.args[0]).name
    print(f"{name} received: stopped; {out} is as it was before this run", file=sys.stderr)
    raise SystemExit(128 + e.args[0]) from None
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  if late:
    print(f"{signal.Signals(late[0]).name} received as the output moved into place: stopped "
          f"once it was; {out} holds this run's output", file=sys.stderr)
    raise SystemExit(128 + late[0])


def main(argv) -> int:
  spec, overrides, flags = cli.parse(argv, FLAGS)
  if spec or overrides:
    raise ConfigError("clean takes no --config; see --help for its flags")
  missing = [f"--{k}" for k in ("corpus", "out") if not flags[k]]
  if missing:
    raise ConfigError(f"{', '.join(missing)} required")
  cli.check_flags(flags, (("samples", flags["samples"] >= 0, ">= 0"),  # (nan, inf too)
                          ("shard_mb", 0 < flags["shard_mb"] < float("inf"), "finite and > 0")))
  cli.output_folder("out", flags["out"])
  _check_out(flags["out"], flags["overwrite"])
  stages = clean_lib.build_stages(flags)
  with _stopped_by_signals(flags["out"]):
    summary = clean_lib.run(flags["corpus"], flags["format"], flags["text_field"], flags["out"],
                            stages, workers=flags["workers"], samples=flags["samples"],
                            shard_mb=flags["shard_mb"], plots=flags["plots"])
  print(f"wrote {summary['documents_out']} documents to {flags['out']} "
        f"({summary['shards']} shards), report {flags['out']}/report.md")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
