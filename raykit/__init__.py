"""raykit: the Ray machinery the stages share (pipeline/ and indexing/ both import it; it imports neither).

    raykit.config.DistributeConfig   retries, backoff, timeouts, progress interval, the cluster address
    raykit.cluster.init_ray          join a cluster or start a local in-process Ray on 127.0.0.1
    raykit.actors                    a pool of stateful actors (one model each) running jobs with bounded
                                     in-flight calls, retries with backoff, dead actors replaced, stragglers killed

Importing raykit does not import ray: every module imports it where it is used.
"""
