"""Write expected.json beside the two fixture checkpoints (run once, at commit d3436be).

    python tests/data/checkpoint_v0_2/make_expected.py tests/data/checkpoint_v0_2
"""

import json
import sys

import torch

from polyreg_cnf.models import CNFVAE, CNFDensityEstimator

out = sys.argv[1]
cnf = CNFDensityEstimator.load_from_checkpoint(f"{out}/cnf.ckpt").eval()
vae = CNFVAE.load_from_checkpoint(f"{out}/vae.ckpt").eval()
x = torch.linspace(-2, 2, 10).reshape(5, 2)
g = torch.Generator().manual_seed(0)
images = torch.rand(3, 64, generator=g).round()  # 8x8 digits, binarized
eps = torch.randn(3, vae.hparams["z_dim"], generator=g)
with torch.no_grad():
    log_prob = cnf.log_prob(x)
    rec, kl = vae.elbo_terms(images, eps=eps)
expected = {"made_by": "polyreg-cnf d3436be",
            "cnf": {"x": x.tolist(), "log_prob": log_prob.tolist()},
            "vae": {"images": images.tolist(), "eps": eps.tolist(),
                    "reconstruction": rec.tolist(), "kl": kl.tolist()}}
with open(f"{out}/expected.json", "w") as f:
    json.dump(expected, f, indent=1)
