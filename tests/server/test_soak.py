"""`ldm soak`'s accounting, for 30 s against the session's real tritonserver (tiny model): every
request of the mix (plain gRPC and HTTP, img2img, regional, client cancels, short timeouts,
bad inputs) ends in an image, a coded error or a client cancel (none lost), and the server's
ldm_* counters agree with the client's counts. Memory and fd flatness needs a longer run
(`ldm soak --minutes 20`, docs/reliability.md); here it is only sampled."""

from serving.bench.soak import RequestMaker, soak


def test_short_soak_loses_nothing_and_the_counters_agree(server, tiny_repo):
    maker = RequestMaker.for_repository(tiny_repo, max_steps=20)
    report = soak(
        server.grpc_url,
        server.http_url,
        server.metrics_url,
        server.process.pid,
        30.0,
        maker,
        concurrency=4,
        sample_s=5.0,
        log=lambda m: None,
    )
    assert report["lost"] == 0, report["results"]
    assert report["counters_consistent"] == dict.fromkeys(report["counters_consistent"], True), report
    kinds = {key.split()[0] for key in report["by_kind"]}
    assert kinds == {"grpc", "http", "img2img", "regional", "cancel", "timeout", "invalid"}, report["by_kind"]
    assert report["client"]["images"] > 0 and report["client"]["invalid_arg"] > 0 and report["client"]["cancelled"] > 0
    assert len(report["samples"]) >= 2 and report["memory_and_fds"]
