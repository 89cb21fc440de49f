"""A uniform model soup: the mean of the weights of GAN pipelines fine-tuned from one init.

python soup.py OUT PIPE1 PIPE2 ...   (OUT: a copy of PIPE1 with the generator's weights averaged)
"""
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file

out, pipes = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
name = "generator/diffusion_pytorch_model.safetensors"
states = [load_file(p / name) for p in pipes]
assert all(s.keys() == states[0].keys() for s in states)
soup = {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
        if states[0][k].is_floating_point() else states[0][k] for k in states[0]}
shutil.copytree(pipes[0], out)
save_file(soup, out / name, metadata={"format": "pt"})
(out / "soup.json").write_text(json.dumps({"mean_of": [str(p) for p in pipes]}, indent=1))
print(out, len(pipes), "pipelines averaged")
