"""`halluscope bench`: hallucination benchmarks (POPE, CHAIR, and the PIH task as `halluscope eval` asks it) run
on one model under plain greedy decoding and under each named mitigation method, into one resumable run directory
with one comparison table.

    from halluscope.bench.step import bench_step
    result = bench_step("runs/pope", benchmark="pope", model="organism-scenes", methods=["vcd", "heads:L0H1,L1H2"])
    result["table"]   # method, split, accuracy, precision, recall, f1, yes_ratio

Modules: `data` (synthetic scenes or a COCO-format directory), `methods` (what is compared: every registered
decoding method, with settings), `pope`, `chair` and `pih` (items, scoring, setting lines and plot of each
benchmark), `step` (the run: shards per method, the table, its markdown and plot), `compare` (finished runs side
by side, changes with paired bootstrap intervals over images).
"""
