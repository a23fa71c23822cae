import math

import pandas as pd

from nern.plots import distillation_start, plot_training_curves

NAN = math.nan


def curves(kd, fmd):
    """Loss rows at 10..40 with an evaluation row (no losses) at 20, as curves.csv interleaves them."""
    return pd.DataFrame({"iteration": [10, 20, 20, 30, 40], "loss": [1, 1, NAN, 5, 4], "kd": kd, "fmd": fmd,
                         "eval_test_top1": [NAN, NAN, 50, NAN, NAN]})


def test_distillation_start_marks_the_end_of_a_reconstruction_only_phase(tmp_path):
    assert distillation_start(curves([0, 0, NAN, 1, 1], [0, 0, NAN, 2, 2])) == 30.0
    assert distillation_start(curves([0, 0, NAN, 0, 1], [0, 0, NAN, 0, 0])) == 40.0
    assert distillation_start(curves([1, 1, NAN, 1, 1], [2, 2, NAN, 2, 2])) is None  # distils from the start
    assert distillation_start(curves([0] * 5, [0] * 5)) is None  # reconstruction only
    curves([0, 0, NAN, 1, 1], [0, 0, NAN, 2, 2]).to_csv(tmp_path / "curves.csv", index=False)
    plot_training_curves(tmp_path / "curves.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
