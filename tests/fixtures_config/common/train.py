# Shared training defaults used by the smoke config (a fixture for tests/test_all_configs.py).
train = dict(
    max_iter=100,
    base_lr=1e-4,
    output_dir="./output/smoke",
    amp=dict(enabled=False),
    device="cpu",
)
