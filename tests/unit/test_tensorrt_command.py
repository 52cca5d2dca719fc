"""The TensorRT build command carries each contract's min/opt/max shapes (no GPU here to run it)."""

from families.checkpoint import CheckpointInfo
from families.contracts import component_contracts
from export.repository import MAX_BATCH
from export.tensorrt import trtexec_command


def test_unet_profile_covers_batch_and_sizes(tiny_checkpoint):
    info = CheckpointInfo.read(tiny_checkpoint)
    unet = component_contracts(info, 64, MAX_BATCH)["unet"]
    command = trtexec_command(unet, "unet.onnx", "unet.plan")
    assert "--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x16x32" in command
    assert "--optShapes=sample:4x4x8x8,timestep:4,encoder_hidden_states:4x16x32" in command
    assert "--maxShapes=sample:64x4x16x16,timestep:64,encoder_hidden_states:64x16x32" in command
