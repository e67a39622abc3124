"""`halluscope bench`: object-hallucination benchmarks (POPE, CHAIR) run on one model under plain greedy decoding
and under each named mitigation method, into one resumable run directory with one comparison table.

    from halluscope.bench.step import bench_step
    result = bench_step("runs/pope", benchmark="pope", model="organism-scenes", methods=["heads:L0H1,L1H2"])
    result["table"]   # method, split, accuracy, precision, recall, f1, yes_ratio

Modules: `data` (synthetic scenes or a COCO-format directory), `methods` (what is compared), `pope` and `chair`
(items and scoring), `step` (the run: shards per method, the table, its markdown and plot).
"""
