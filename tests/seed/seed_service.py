"""A port of the seed's `mcp_session_service.py` (shared/seed/000_d1f2697a762dbbd7.md): the
Redis session manager of the Python backend this project must stay compatible with.

Used by tests/seed_compat.rs as a real second writer and reader against the same redis-server:
    python seed_service.py REDIS_URL create ID USER_ID API_KEY
    python seed_service.py REDIS_URL get ID          -> the session as JSON, or null
    python seed_service.py REDIS_URL all             -> every session as a JSON list
    python seed_service.py REDIS_URL touch ID
"""

import json
import sys
import uuid
from datetime import datetime

import redis

SESSION_PREFIX = "mcp:session:"
SESSION_TTL = 86400  # 24 * 60 * 60


class McpSessionService:
    def __init__(self, url):
        self.redis = redis.Redis.from_url(url, decode_responses=True)

    def _key(self, connection_id):
        return f"{SESSION_PREFIX}{connection_id}"

    def create_session(self, connection_id, metadata=None):
        now = datetime.utcnow().isoformat()
        session = {
            "connection_id": connection_id,
            "created_at": now,
            "last_activity_at": now,
            "metadata": metadata or {},
        }
        self.redis.setex(self._key(connection_id), SESSION_TTL, json.dumps(session))
        return session

    def get_session(self, connection_id):
        data = self.redis.get(self._key(connection_id))
        if not data:
            return None
        session = json.loads(data)
        # The seed's logs and monitoring parse these; a record it cannot parse is a bug here.
        datetime.fromisoformat(session["created_at"])
        datetime.fromisoformat(session["last_activity_at"])
        return session

    def update_session_activity(self, connection_id):
        session = self.get_session(connection_id)
        if session is None:
            return False
        session["last_activity_at"] = datetime.utcnow().isoformat()
        self.redis.setex(self._key(connection_id), SESSION_TTL, json.dumps(session))
        return True

    def get_all_sessions(self):
        sessions = []
        for key in self.redis.keys(f"{SESSION_PREFIX}*"):
            session = self.get_session(key[len(SESSION_PREFIX):])
            if session:
                sessions.append(session)
        return sessions


def main():
    url, command, *args = sys.argv[1:]
    service = McpSessionService(url)
    if command == "create":
        connection_id, user_id, api_key = args
        metadata = {"user_id": user_id, "api_key_prefix": api_key[:12]}
        result = service.create_session(connection_id or str(uuid.uuid4()), metadata)
    elif command == "get":
        result = service.get_session(args[0])
    elif command == "all":
        result = service.get_all_sessions()
    elif command == "touch":
        result = service.update_session_activity(args[0])
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
