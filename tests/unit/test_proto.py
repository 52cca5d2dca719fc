"""The public API's generated Python code (serving/gateway/protos.py) is the .proto's, compiled
fresh: nothing stale, nothing edited by hand."""
import shutil

from google.protobuf import descriptor_pb2

from serving.gateway import protos
from serving.gateway.protos import images_pb2


def compiled(proto_root, tmp_path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "images.desc"
    protos.protoc([f"-I{proto_root}", f"--descriptor_set_out={out}", str(proto_root / protos.SOURCES[0])])
    file = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # a descriptor set spells out each field's JSON name; generated code leaves it implied
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return file


def test_generated_code_is_the_proto_compiled_now(tmp_path):
    loaded = descriptor_pb2.FileDescriptorProto.FromString(images_pb2.DESCRIPTOR.serialized_pb)
    assert loaded == compiled(protos.PROTO_ROOT, tmp_path)
    assert images_pb2.__file__.startswith(str(protos.generated_dir()))


def test_the_service_has_a_unary_a_server_streaming_and_a_bidirectional_method():
    service = images_pb2.DESCRIPTOR.services_by_name["Images"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "Session", "ListSamplers", "ListModels", "ListLoras", "LoadLora",
                            "UnloadLora"}
    assert all(not methods[n].client_streaming and not methods[n].server_streaming for n in ("LoadLora", "UnloadLora"))
    for name in ("ListSamplers", "ListModels", "ListLoras"):
        listing = methods[name]
        assert not listing.client_streaming and not listing.server_streaming
        assert (listing.input_type.name, listing.output_type.name) == (f"{name}Request", f"{name}Response")
    session = methods["Session"]
    assert session.client_streaming and session.server_streaming
    assert (session.input_type.name, session.output_type.name) == ("SessionRequest", "GenerateEvent")
    assert {f.name for f in session.input_type.oneofs_by_name["message"].fields} == {"start", "steer", "cancel"}
    events = {f.name for f in images_pb2.GenerateEvent.DESCRIPTOR.oneofs_by_name["event"].fields}
    assert events == {"progress", "image", "started", "steer_ack", "steered"}
    assert methods["Generate"].output_type.name == "GenerateResponse" and not methods["Generate"].server_streaming
    assert methods["GenerateStream"].output_type.name == "GenerateEvent" and methods["GenerateStream"].server_streaming
    assert images_pb2.DESCRIPTOR.package == "ldm.v1"


def test_an_edited_proto_is_generated_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "proto"
    shutil.copytree(protos.PROTO_ROOT, root)
    source = root / protos.SOURCES[0]
    before = protos.ensure_generated(root)
    source.write_text(source.read_text().replace("  string region_divisions = 31;", "  string region_divisions = 31;\n  int32 added_field = 99;"))
    after = protos.ensure_generated(root)
    assert after != before
    assert "added_field" in (after / "ldm" / "v1" / "images_pb2.pyi").read_text()
    assert "added_field" not in (before / "ldm" / "v1" / "images_pb2.pyi").read_text()
    assert protos.ensure_generated(root) == after  # cached
