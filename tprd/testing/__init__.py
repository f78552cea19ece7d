"""Test harnesses, not used by training or inference: the detrex parity harness
(:mod:`.parity`), the distillation parity harness (:mod:`.distill_parity`) and the fixtures' weight
fill rule (:mod:`.fill`). ``tools/detrex_parity.py``, ``tools/distill_parity.py`` and the tests
import them from here."""
