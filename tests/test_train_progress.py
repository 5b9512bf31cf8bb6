"""The training progress bar shows the running mean loss of the current logging window, not a stale loss."""

from upstack.train.loop import _Progress


def test_the_bar_loss_is_the_windows_running_mean():
    p = _Progress(start=0, tokens=0, elapsed_before=0.0)
    for step, loss in enumerate([3.0, 2.0, 1.0]):
        p.last = {"loss": loss}
        p.count(step, 10, 0.1)
    assert p.mean_loss() == 2.0 and p.tokens == 30
    p.window_loss, p.window_steps = 0.0, 0  # a logged step starts a new window
    p.last = {"loss": 0.5}
    p.count(3, 10, 0.1)
    assert p.mean_loss() == 0.5
