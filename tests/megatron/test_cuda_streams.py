"""The high-priority stream of the MLP post/residual (``cuda_streams.py``): its synchronisation, checked
with stand-in streams on CPU, and the layer on a GPU (skipped without one)."""

import contextlib

import pytest
import torch

from mhc_megatron.megatron.model.cuda_streams import run_on_stream
from mhc_megatron.modules import Mixing


class FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_run_on_stream_orders_and_records(monkeypatch):
    log = []
    side, current = FakeStream("side", log), FakeStream("current", log)
    names = {}
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: log.append(
        f"{names[id(tensor)]} recorded on {stream.name}"))

    @contextlib.contextmanager
    def on(stream):
        log.append(f"enter {stream.name}")
        yield
        log.append(f"leave {stream.name}")

    streams, output = torch.ones(2, 8), torch.ones(2, 2)
    mixing = Mixing(torch.ones(2, 4), torch.ones(2, 4, 4), torch.ones(2, 4))
    names.update({id(streams): "streams", id(output): "output", id(mixing.h_post): "h_post",
                  id(mixing.h_res): "h_res", id(mixing.h_pre): "h_pre"})

    def post_res(streams, output, mixing):
        log.append("post_res")
        result = streams * 2
        names[id(result)] = "result"
        return result

    result = run_on_stream(side, post_res, streams, output, mixing, current=current, stream_context=on)
    assert torch.equal(result, streams * 2)
    assert log == [
        "side waits for current", "enter side", "post_res", "leave side",
        "streams recorded on side", "output recorded on side", "h_post recorded on side", "h_res recorded on side",
        "h_pre recorded on side",
        "result recorded on current", "current waits for side",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the high-priority stream needs CUDA")
def test_layer_on_high_priority_stream_matches_default_stream():
    from mhc_megatron.megatron import MhcTransformerConfig, build_model_chunks, initialize_parallel

    initialize_parallel()
    outputs = {}
    for switch in (False, True):
        config = MhcTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hc_mode="mhc",
                                      num_streams=4, mhc_post_res_high_priority_stream=switch,
                                      hidden_dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(0)
        model = build_model_chunks(config, 128, 32, backend="local")[0].cuda()
        hidden = torch.randn(32, 2, 64, device="cuda", requires_grad=True)
        out = model.decoder(hidden_states=hidden, attention_mask=None)
        out.square().mean().backward()
        outputs[switch] = (out.detach(), hidden.grad)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
