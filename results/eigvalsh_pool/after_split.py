# Self-contained: one batched eigvalsh call before and after the same batch was solved on two Python threads.
#   python results/eigvalsh_pool/after_split.py
import time, statistics, torch
from concurrent.futures import ThreadPoolExecutor
torch.set_num_threads(2)
pool = ThreadPoolExecutor(2)
X = torch.randn(12, 128, 384); A = X @ X.mT
def one(): return torch.linalg.eigvalsh(A)
def split(): return torch.cat([f.result() for f in [pool.submit(torch.linalg.eigvalsh, x) for x in A.tensor_split(2)]])
def t(fn):
    s = time.perf_counter(); fn(); return 1e3*(time.perf_counter()-s)
print("one-call x5 before any split:", [round(t(one),2) for _ in range(5)])
print("split x5:", [round(t(split),2) for _ in range(5)])
print("one-call x5 after splits:", [round(t(one),2) for _ in range(5)])
time.sleep(1)
print("one-call x5 after 1 s sleep:", [round(t(one),2) for _ in range(5)])
