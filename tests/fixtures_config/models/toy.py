# A tiny lazy model: nothing is built when this file is loaded.
from tprd.config import LazyCall as L
import torch.nn as nn

model = L(nn.Linear)(in_features=8, out_features=16, bias=True)
