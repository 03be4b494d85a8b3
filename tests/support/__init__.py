"""What tests share: builders of real inputs, not stand-ins for real parts.

Parts:
- `checkpoints.py`: tiny random-weight Hugging Face checkpoints (`make_checkpoint`).
- `tiny_tokenizer.py`: a small trained tokenizer directory (`write_tokenizer_dir`, `CORPUS`).
- `served.py`: `potluck serve` in a subprocess (`ServedModel`) and `free_port()`.
- `loopback_capture.py`: a tcpdump capture of loopback traffic and the ZMTP greetings in it.
- `problems.py`: placement problems: random small clusters with an exhaustive reference, and the
  clusters the benchmarks measure.
"""
