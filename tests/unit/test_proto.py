"""The public API's generated Python code (serving/gateway/protos.py) is the .proto's: the
message classes, enums and gRPC stubs the gateway imports are checked, definition by definition,
against the descriptor protoc parses from proto/ldm/v1/images.proto now (and the service's
methods against the .proto's text itself), so a stale or hand-edited generated module fails; a
check that an edited .proto makes the comparison fail shows it can."""

import re
import shutil

from google.protobuf import descriptor_pb2

from serving.gateway import protos
from serving.gateway.protos import images_pb2, images_pb2_grpc


def compiled(proto_root, tmp_path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "images.desc"
    protos.protoc([f"-I{proto_root}", f"--descriptor_set_out={out}", str(proto_root / protos.SOURCES[0])])
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def proto_definitions(file: descriptor_pb2.FileDescriptorProto) -> dict:
    """Every message's fields (number, type, repeated, message/enum type, oneof), every enum's
    values and every method's types and streaming, as the .proto defines them."""
    defs = {}

    def message(m, prefix):
        name = f"{prefix}.{m.name}"
        defs[f"message {name}"] = {
            f.name: (
                f.number,
                f.type,
                f.label == f.LABEL_REPEATED,
                f.type_name.lstrip(".") or None,
                m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
            )
            for f in m.field
        }
        for nested in m.nested_type:
            message(nested, name)
        for e in m.enum_type:
            defs[f"enum {name}.{e.name}"] = {v.name: v.number for v in e.value}

    for m in file.message_type:
        message(m, file.package)
    for e in file.enum_type:
        defs[f"enum {file.package}.{e.name}"] = {v.name: v.number for v in e.value}
    for service in file.service:
        defs[f"service {file.package}.{service.name}"] = {
            m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."), m.client_streaming, m.server_streaming)
            for m in service.method
        }
    return defs


def module_definitions(module) -> dict:
    """The same, read from the generated module's classes (what the gateway's code uses)."""
    defs = {}

    def message(d):
        defs[f"message {d.full_name}"] = {
            f.name: (
                f.number,
                f.type,
                f.is_repeated,
                (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else None,
                f.containing_oneof.name if f.containing_oneof else None,
            )
            for f in d.fields
        }
        for nested in d.nested_types:
            message(nested)
        for e in d.enum_types:
            defs[f"enum {e.full_name}"] = {v.name: v.number for v in e.values}

    for name, d in module.DESCRIPTOR.message_types_by_name.items():
        assert getattr(module, name).DESCRIPTOR is d  # the class the code imports is this one
        message(d)
    for e in module.DESCRIPTOR.enum_types_by_name.values():
        defs[f"enum {e.full_name}"] = {v.name: v.number for v in e.values}
        assert {v.name: getattr(module, v.name) for v in e.values} == defs[f"enum {e.full_name}"]  # module constants
    for service in module.DESCRIPTOR.services_by_name.values():
        defs[f"service {service.full_name}"] = {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }
    return defs


def differences(expected: dict, got: dict) -> list:
    out = [f"{k}: missing" for k in expected.keys() - got.keys()]
    out += [f"{k}: not in the .proto" for k in got.keys() - expected.keys()]
    for k in expected.keys() & got.keys():
        for name in expected[k].keys() | got[k].keys():
            if expected[k].get(name) != got[k].get(name):
                out.append(f"{k}.{name}: .proto {expected[k].get(name)}, generated {got[k].get(name)}")
    return sorted(out)


def test_generated_classes_are_the_protos_definitions(tmp_path):
    expected = proto_definitions(compiled(protos.PROTO_ROOT, tmp_path))
    assert len(expected) > 20 and differences(expected, module_definitions(images_pb2)) == []
    assert images_pb2.__file__.startswith(str(protos.generated_dir()))


def test_the_services_methods_are_the_protos_text():
    """Read from the .proto's text without protoc: every rpc, its streaming and its types."""
    text = protos.PROTO_ROOT.joinpath(protos.SOURCES[0]).read_text()
    text = re.sub(r"//[^\n]*", "", text)
    rpcs = {
        m[0]: (f"{protos.PACKAGE}.{m[2]}", f"{protos.PACKAGE}.{m[4]}", bool(m[1]), bool(m[3]))
        for m in re.findall(
            r"\brpc\s+(\w+)\s*\(\s*(stream\s+)?(\w+)\s*\)\s*returns\s*\(\s*(stream\s+)?(\w+)\s*\)", text
        )
    }
    assert len(rpcs) >= 8 and module_definitions(images_pb2)[f"service {protos.PACKAGE}.Images"] == rpcs
    messages = set(re.findall(r"^message\s+(\w+)", text, re.M))
    assert messages == set(images_pb2.DESCRIPTOR.message_types_by_name)


def test_the_grpc_stub_calls_each_method_by_its_path_and_types():
    """images_pb2_grpc (generated separately from images_pb2): each method's call kind, path and
    (de)serializers, from a channel that records what the stub asks of it."""
    calls = {}

    class Channel:
        def __getattr__(self, kind):
            def make(path, request_serializer=None, response_deserializer=None, **_):
                calls[path] = (kind, request_serializer, response_deserializer)
                return object()

            return make

    images_pb2_grpc.ImagesStub(Channel())
    service = images_pb2.DESCRIPTOR.services_by_name["Images"]
    kinds = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }
    expected = {
        f"/{service.full_name}/{m.name}": (
            kinds[m.client_streaming, m.server_streaming],
            getattr(images_pb2, m.input_type.name).SerializeToString,
            getattr(images_pb2, m.output_type.name).FromString,
        )
        for m in service.methods
    }
    assert calls == expected
    servicer = images_pb2_grpc.ImagesServicer
    assert all(callable(getattr(servicer, m.name, None)) for m in service.methods)


def test_an_edited_proto_fails_the_comparison(tmp_path):
    """The check can fail: against a .proto with a field added, one renumbered and a method
    turned streaming, the generated module differs exactly there."""
    root = tmp_path / "proto"
    shutil.copytree(protos.PROTO_ROOT, root)
    source = root / protos.SOURCES[0]
    text = source.read_text()
    edited = text.replace(
        "  string region_divisions = 31;", "  string region_divisions = 31;\n  int32 added_field = 99;"
    )
    edited = edited.replace("optional int32 steps = 4;", "optional int32 steps = 98;")
    edited = re.sub(
        r"rpc Generate\s*\(\s*GenerateRequest\s*\)\s*returns\s*\(\s*GenerateResponse",
        "rpc Generate(GenerateRequest) returns (stream GenerateResponse",
        edited,
    )
    assert edited.count("added_field") == 1 and "steps = 98" in edited and "(stream GenerateResponse" in edited
    source.write_text(edited)
    found = differences(proto_definitions(compiled(root, tmp_path)), module_definitions(images_pb2))
    assert any(d.startswith("message ldm.v1.GenerateRequest.added_field:") for d in found), found
    assert any(d.startswith("message ldm.v1.GenerateRequest.steps:") for d in found), found
    assert (
        "service ldm.v1.Images.Generate: .proto ('ldm.v1.GenerateRequest', 'ldm.v1.GenerateResponse', False, True), "
        "generated ('ldm.v1.GenerateRequest', 'ldm.v1.GenerateResponse', False, False)" in found
    ), found
    assert len(found) == 3, found


def test_the_service_has_a_unary_a_server_streaming_and_a_bidirectional_method():
    service = images_pb2.DESCRIPTOR.services_by_name["Images"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {
        "Generate",
        "GenerateStream",
        "Session",
        "ListSamplers",
        "ListModels",
        "ListLoras",
        "LoadLora",
        "UnloadLora",
    }
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
    source.write_text(
        source.read_text().replace(
            "  string region_divisions = 31;", "  string region_divisions = 31;\n  int32 added_field = 99;"
        )
    )
    after = protos.ensure_generated(root)
    assert after != before
    assert "added_field" in (after / "ldm" / "v1" / "images_pb2.pyi").read_text()
    assert "added_field" not in (before / "ldm" / "v1" / "images_pb2.pyi").read_text()
    assert protos.ensure_generated(root) == after  # cached
