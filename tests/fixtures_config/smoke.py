# Always-present smoke config: exercised by tests/test_all_configs.py even when the repository has
# no configs yet. Uses relative imports between package-less folders, like the real configs.
from tprd.config import LazyCall as L

from .common.train import train
from .models.toy import model

train.max_iter = 10
optimizer = L("torch.optim.AdamW")(params=None, lr="${train.base_lr}", weight_decay=1e-4)
dataloader = dict(batch_size=2, num_workers=0, sizes=[480, 512])
