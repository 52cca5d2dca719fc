"""The loopback load-balancing harness: `ldm serve` replicas (tritonserver + gateway each)
behind Debian's nginx as a gRPC load balancer, the load and crash scenario, and the lookup of
the external tools the deployment tests use. Run by tests/deploy/test_deploy_*.py and by
`python -m tests.lb.demo`."""
