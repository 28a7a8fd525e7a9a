"""Python client for the RMT classifier service (httpx; sync ``Client`` and asyncio ``AsyncClient``).

    from rmt_client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as rmt:
        created = rmt.create("pets/", name="pets", config={"method": "r-amt"})   # pets/<label>/<image>
        rmt.wait(created, progress=lambda job: print(job["status"], job["progress"]))
        for result in rmt.classify(created.classifier_id, "new_photos/", top_k=3):
            print(result["filename"], result["predictions"][0])
        rmt.export(created.classifier_id, "pets.zip")        # model.onnx + labels + preprocessing + example
"""
from ._common import Created, JobFailed, RmtError
from .aio import AsyncClient
from .client import Client

__all__ = ["AsyncClient", "Client", "Created", "JobFailed", "RmtError"]
