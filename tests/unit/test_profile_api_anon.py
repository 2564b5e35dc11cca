"""``GET /v1/profiles/{id}`` with a raw anonymous id (as the SDKs send ``anonymousId``): looked up
as ``anon:<id>`` when ``<id>`` has no profile; a user_id spelled alike wins; the 404 names the form."""

from __future__ import annotations

import orjson

from tests.unit.test_profile_api import HDR, FakeRedis, _client, _profile, run


def test_a_raw_anonymous_id_finds_the_guest_profile() -> None:
    async def go():
        r = FakeRedis()
        r.kv[b"t:profile:anon:nc-guest-1"] = orjson.dumps(_profile("anon:nc-guest-1"))
        r.kv[b"t:profile:anon:g-77"] = orjson.dumps(_profile("anon:g-77"))
        r.kv[b"t:alias:anon:g-77"] = b"c-5"              # a stitched guest: its customer's profile
        r.kv[b"t:profile:c-5"] = orjson.dumps(_profile("c-5"))
        r.kv[b"t:profile:same"] = orjson.dumps(_profile("same"))
        r.kv[b"t:profile:anon:same"] = orjson.dumps(_profile("anon:same"))
        c = await _client(r)
        try:
            async def get(i):
                resp = await c.get(f"/v1/profiles/{i}", headers=HDR)
                return resp.status, (await resp.json()), resp.headers.get("Content-Location")
            assert await get("nc-guest-1") == (200, _profile("anon:nc-guest-1"), "/v1/profiles/anon%3Anc-guest-1")
            assert await get("anon:nc-guest-1") == (200, _profile("anon:nc-guest-1"),
                                                    "/v1/profiles/anon%3Anc-guest-1")
            assert await get("g-77") == (200, _profile("c-5"), "/v1/profiles/c-5")
            assert (await get("same"))[1] == _profile("same")  # the user_id wins
            st, body, _ = await get("nobody")
            assert st == 404 and body["error"] == "not_found" and "anon:<id>" in body["detail"]
            st, body, _ = await get("anon:nobody")
            assert st == 404 and "anon:<id>" not in body["detail"]
        finally:
            await c.close()
    run(go())
