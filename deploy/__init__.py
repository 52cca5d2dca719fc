"""Deployment recipes (Dockerfile, Kubernetes manifests, nginx config) and the helpers that
check them on a machine without a cluster: tool lookup, the loopback load-balancing demo."""
