"""The Hugging Face Space: mmdiff's browser demo (``mmdiff.demo``), served with ``python app.py``.

The repository root is the Space (README front matter, ``requirements.txt``, this file). Pipelines come
from ``pipelines/`` unless ``MMDIFF_GAN_PIPELINE`` / ``MMDIFF_LDM_PIPELINE`` name other folders or
Hub repo ids. Locally, ``mmdiff demo`` does the same with flags.
"""

from mmdiff.demo import build_demo, launch

demo = build_demo()

if __name__ == "__main__":
    launch(demo)
