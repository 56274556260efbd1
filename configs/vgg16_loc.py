"""The localisation net of Appendix A: net D whose fc8 predicts a box per class (PCR), fine-tuned
on ILSVRC-2012's boxes from the classification net trained at the same S, at learning rate 1e-3:

    python -m vggjax.main --config=configs/vgg16_loc.py --workdir=runs/loc256 \\
        --config.init_from=runs/vgg16 --config.loc.annotations=BBOX_DIR
    python -m vggjax.main --config=configs/vgg16_loc.py:384 --workdir=runs/loc384 \\
        --config.init_from=runs/vgg16-384 --config.loc.annotations=BBOX_DIR --config.loc.scales="(352,384)"
    python -m vggjax.main --config=configs/vgg16_loc.py --workdir=runs/loc256 --mode=eval \\
        --config.init_from=runs/vgg16 --config.loc.annotations=BBOX_DIR     # Tables 8 and 9
    python -m vggjax.main --config=configs/vgg16_loc.py:384 --workdir=runs/loc-fusion --mode=eval \\
        --config.loc.checkpoints="('runs/loc256', 'runs/loc384')" --config.loc.classifier=runs/vgg16-384 \\
        --config.loc.annotations=BBOX_DIR                                   # Table 9's fusion

BBOX_DIR holds ILSVRC2012_bbox_train_v2.tar.gz and ILSVRC2012_bbox_val_v3.tgz unpacked; the
images are TFDS's imagenet2012 (--config.data_dir). Table 8's other settings: single-class
regression, --config.objective=scr; fine-tuning fc6–fc8 only, --config.trainable=fc. The paper
gives no epoch budget for these nets: this keeps the classification recipe's (74, with the
learning rate cut on plateau of the validation localisation error).
"""

from vggjax import recipe


def get_config(scale: str = "256"):
    c = recipe.paper_recipe("D", scale)
    c.objective = "pcr"
    c.init_layers = "all_but_fc8"  # fc8 is new and random (Sect. A.1)
    c.learning_rate = 1e-3
    return c
