import pytest
import torch
from torch import nn

from splitexport import InvalidCutError, UnknownLayerError, UntraceableModelError, list_cut_points, partition
from splitexport.models import mlp, mobilenet_cnn, resnet_cnn


@pytest.mark.parametrize(
    ("factory", "cuts"),
    [(resnet_cnn, ["layer1", "layer3"]), (mobilenet_cnn, ["block1"]), (mlp, ["relu1", "relu2"])],
)
def test_segments_compose_to_the_model(factory, cuts, example_input) -> None:
    model = factory().eval()
    part = partition(model, cuts, example_input)
    assert [s.name for s in part.segments] == (["A", "B"] if len(cuts) == 1 else ["A", "B", "C"])
    assert [s.role for s in part.segments][:2] == ["device", "server"]
    x = torch.randn(5, 1, 8, 8)
    y = x
    for seg in part.segments:
        seg.module.eval()
        y = seg.module(y)
    assert torch.equal(y, model(x))
    assert sum(s.num_parameters for s in part.segments) == sum(p.numel() for p in model.parameters())
    # independent copies: training a segment leaves the model untouched
    assert all(p.data_ptr() != q.data_ptr() for s in part.segments for p in s.module.parameters() for q in model.parameters())


def test_double_split_roles_and_shapes(example_input) -> None:
    part = partition(resnet_cnn(), ["layer1", "layer3"], example_input)
    assert part.split == "double"
    a, b, c = part.segments
    assert (a.role, b.role, c.role) == ("device", "server", "device")
    assert a.output_shape == b.input_shape == (2, 16, 8, 8)
    assert b.output_shape == c.input_shape == (2, 32, 4, 4)
    assert c.is_last and c.trains_with == "labels" and a.trains_with == "gradient"


def test_cut_points_list_shapes_params_and_flops(example_input) -> None:
    points = {p.name: p for p in list_cut_points(resnet_cnn(), example_input)}
    assert "layer1.conv1" not in points  # the residual skip crosses it
    p = points["layer2"]
    assert p.output_shape == (2, 32, 4, 4) and p.bytes_per_sample == 32 * 4 * 4 * 4
    total = sum(q.numel() for q in resnet_cnn().parameters())
    assert p.params_before + p.params_after == total
    assert p.flops_before > 0 and p.flops_after > 0


def test_unknown_layer_suggests_close_names(example_input) -> None:
    with pytest.raises(UnknownLayerError, match=r"'layr2'.*Did you mean 'layer2'"):
        partition(resnet_cnn(), ["layr2"], example_input)


def test_cut_across_skip_connection_names_edge_and_nearest_cuts(example_input) -> None:
    with pytest.raises(InvalidCutError) as err:
        partition(resnet_cnn(), ["layer2.conv1"], example_input)
    msg = str(err.value)
    assert "2 tensors cross" in msg and "layer2.shortcut" in msg
    assert "Nearest valid cuts: 'layer1', 'layer2'" in msg


def test_cuts_out_of_order(example_input) -> None:
    with pytest.raises(InvalidCutError, match="out of order"):
        partition(resnet_cnn(), ["layer3", "layer1"], example_input)


def test_cut_after_last_layer(example_input) -> None:
    with pytest.raises(InvalidCutError, match="nothing after it"):
        partition(mlp(), ["fc3"], example_input)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow cannot be traced
            x = x * 2
        return self.fc(x.flatten(1))


def test_untraceable_model(example_input) -> None:
    with pytest.raises(UntraceableModelError, match="data-dependent control flow"):
        partition(_DataDependent(), ["fc"], example_input)


class _SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc(x.flatten(1)))
        return self.head(self.fc(x))


def test_module_used_on_both_sides_is_refused(example_input) -> None:
    with pytest.raises(InvalidCutError, match="fc"):
        partition(_SharedWeights(), ["act"], example_input)
