"""Ray's token authentication, for the project's own clients of a Ray cluster.

Ray 2.60 clusters run with token authentication on: `ray.init()` turns it on for the local cluster
it starts (making a token in ~/.ray/auth_token when there is none), and `ray start --head` turns it
on when RAY_AUTH_MODE=token or a token exists. Every client must then send the token, and a client
sends it only when its own RAY_AUTH_MODE is `token`; without it `ray job submit` or the Job
Submission client get "Unauthorized: Missing authentication token". Ray reads the token from
RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH names, else from ~/.ray/auth_token
(`ray get-auth-token` prints it).

`use_token_auth()` sets RAY_AUTH_MODE=token for this process and the processes it starts, and
makes Ray read its configuration again (Ray reads RAY_AUTH_MODE when it is imported). The demo
calls it with `create=True` before it starts or reaches its head; the speedrun before it submits
a stage.
"""

import os
import subprocess
import sys

AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_PATH = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def has_token() -> bool:
    """Whether Ray finds a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def make_token_if_missing() -> bool:
    """Make Ray's token with `ray get-auth-token --generate` unless one exists; the new file is
    readable by this user only. Returns whether a token was made."""
    from ray._raylet import AuthenticationTokenLoader

    if has_token():
        return False
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.chmod(DEFAULT_TOKEN_PATH, 0o600)
    AuthenticationTokenLoader.instance().reset_cache()
    if not has_token():
        raise RuntimeError(f"made Ray's token in {DEFAULT_TOKEN_PATH}, but Ray looks for it in "
                           f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')}: unset that variable "
                           "or put a token there")
    return True


def use_token_auth(create: bool = False) -> None:
    """Send Ray's token from this process (and the processes it starts) to the clusters it talks to.

    create=True (a program that starts its own head, such as the demo): token authentication
    whatever RAY_AUTH_MODE said, and a token is made when there is none.
    create=False (a client, such as the speedrun): token authentication when RAY_AUTH_MODE is unset
    and a token exists; a RAY_AUTH_MODE set on purpose is left as it is."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if create:
        make_token_if_missing()
    elif mode is not None or not has_token():
        return
    if mode != "token":
        from ray._raylet import Config

        os.environ[AUTH_MODE_ENV] = "token"
        Config.initialize("")  # Ray read RAY_AUTH_MODE when it was imported: read it again
