"""Localisation (Appendix A) on the generated demo set, from a demo classification run C:

    python -m vggjax.main --config=configs/demo.py --workdir=C
    python -m vggjax.main --config=configs/demo_loc.py --workdir=L --config.init_from=C
    python -m vggjax.main --config=configs/demo_loc.py --workdir=L --config.init_from=C --mode=eval

The net is C's (model ""): its Table 1 column, widths, crop and mean RGB; every layer but fc8
starts from C, and fc8 is new, predicting a box per class (PCR; --config.objective=scr for one
box). Tested on the central crop's box for the ground-truth class (Table 8), and on the dense
net's boxes merged for the top-5 classes of C's dense multi-scale evaluation at Q ∈ {72, 88,
104} (Table 9).

Trained and tested at one scale, as the paper's nets, but S = Q = 64, the crop, below C's [72,
104]: the demo's 64-pixel crops give fc6 a window of 2 × 2 cells of the last map, where the
paper's 224 give 7 × 7, and the box regressor then finds the crop's edges by the zero padding
around it, which a window inside a larger image lacks. At Q = 64 the dense window spans the
image's short side, edges and all (trained 20 epochs at S = Q = 96 instead, the dense boxes
missed in 52% of the images, the central crop's in 6%: benchmarks/localise_demo.py). As
demo.py, no dropout; and demo.py's learning rate of 1e-2, not the paper's 1e-3, under which the
narrow net learned its boxes too slowly for the budget.
"""

from vggjax import recipe


def get_config():
    c = recipe.on_demo_set(recipe.paper_recipe("", "64"))  # crop 64: C's config.json gives it too
    c.objective = "pcr"
    c.init_layers = "all_but_fc8"
    c.learning_rate = 1e-2
    return c
