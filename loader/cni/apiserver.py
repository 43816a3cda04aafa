"""A pod's annotations and containers from the API server: the fallback when the runtime
passed no annotations (containerd and CRI-O fill runtimeConfig's
io.kubernetes.cri.pod-annotations; an older or other runtime may not).

Like Kuma CNI: GET the pod named by K8S_POD_NAMESPACE/K8S_POD_NAME with the kubeconfig of
the plugin's configuration, retried while the API server is unreachable (the pod object
exists before its sandbox, so a 404 is final). The official `kubernetes` client, imported
only here: the normal path never pays for it.
"""
import time

from .proto import TRY_AGAIN_LATER, CNIError


class Pod:
    def __init__(self, annotations, containers, init_containers):
        self.annotations = annotations
        self.containers = containers
        self.init_containers = init_containers


def read_pod(kubeconfig, namespace, name, attempts=30, interval=1.0):
    try:
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
    except ImportError:
        raise CNIError(TRY_AGAIN_LATER, "the pod's annotations must come from the API server "
                       "(the runtime passed none), but the 'kubernetes' Python client is not "
                       "installed: pip install kubernetes") from None
    try:
        api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    except Exception as e:   # the loader raises several types for a bad file
        raise CNIError(TRY_AGAIN_LATER, f"kubeconfig {kubeconfig}: {e}") from None
    last = None
    for attempt in range(max(1, attempts)):
        try:
            pod = api.read_namespaced_pod(name, namespace, _request_timeout=5)
            return Pod(dict(pod.metadata.annotations or {}),
                       [c.name for c in pod.spec.containers or []],
                       [c.name for c in pod.spec.init_containers or []])
        except ApiException as e:
            if e.status == 404:
                raise CNIError(TRY_AGAIN_LATER, f"pod {namespace}/{name} not found in the "
                               "API server") from None
            last = f"HTTP {e.status} {e.reason}"
        except Exception as e:   # connection refused, timeout, TLS
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
        if attempt + 1 < attempts:
            time.sleep(interval)
    raise CNIError(TRY_AGAIN_LATER, f"cannot read pod {namespace}/{name} from the API server "
                   f"({last}) after {attempts} attempts")
