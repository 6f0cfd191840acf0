"""etcd authentication through the proxy: two users on one proxy never see
each other's keys, whatever the path (range, serializable range, txn, watch);
a shared watch outlives its opener's token; etcd's own errors come through;
no token or password reaches the proxy's log.

Users: A may read and write /a/, B /b/. Simple tokens live 3 s without use here.
"""

import time

import grpc

from etcdproxy.pb.authpb import auth_pb2
from tests.support.grpcio import GrpcioTestCase, R, prefix_end, rpc_error_or_none

PASSWORDS = {"root": "root-secret-pw", "usera": "usera-secret-pw", "userb": "userb-secret-pw"}
TOKEN_TTL = 3


class AuthTests(GrpcioTestCase):
    etcd_args = ("--auth-token-ttl", str(TOKEN_TTL))

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        auth = cls.d.auth
        for user, password in PASSWORDS.items():
            auth.UserAdd(R.AuthUserAddRequest(name=user, password=password))
        auth.RoleAdd(R.AuthRoleAddRequest(name="root"))
        auth.UserGrantRole(R.AuthUserGrantRoleRequest(user="root", role="root"))
        for user, prefix in (("usera", b"/a/"), ("userb", b"/b/")):
            auth.RoleAdd(R.AuthRoleAddRequest(name="role-" + user))
            perm = auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE,
                                       key=prefix, range_end=prefix_end(prefix))
            auth.RoleGrantPermission(R.AuthRoleGrantPermissionRequest(name="role-" + user, perm=perm))
            auth.UserGrantRole(R.AuthUserGrantRoleRequest(user=user, role="role-" + user))
        auth.AuthEnable(R.AuthEnableRequest())

    def token(self, user, stubs=None):
        stubs = stubs or self.p
        answer = stubs.auth.Authenticate(R.AuthenticateRequest(name=user, password=PASSWORDS[user]))
        return (("token", answer.token),)

    def test_users_never_see_each_others_keys(self):
        a, b = self.token("usera"), self.token("userb")
        key = b"/a/secret"
        self.p.kv.Put(R.PutRequest(key=key, value=b"for A only"), metadata=a)
        # A reads, both ways, so any cache holds the answer
        for serializable in (False, True):
            got = self.p.kv.Range(R.RangeRequest(key=key, serializable=serializable), metadata=a)
            self.assertEqual(got.kvs[0].value, b"for A only")
        for serializable in (False, True):
            self.both_errors("kv", "Range", R.RangeRequest(key=key, serializable=serializable),
                             grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied",
                             metadata=b)
        txn = R.TxnRequest(success=[R.RequestOp(request_range=R.RangeRequest(key=key))])
        self.both_errors("kv", "Txn", txn, grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=b)
        # a watch on A's key: A's is created; B's is refused as etcd refuses it
        watch_a = self.stream(self.p.watch.Watch, metadata=a)
        watch_a.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(watch_a.recv().created)
        answers = []
        for stubs in (self.p, self.d):
            watch_b = self.stream(stubs.watch.Watch, metadata=b)
            watch_b.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
            answers.append(watch_b.recv())
        proxied, direct = answers
        self.assertEqual((proxied.watch_id, proxied.created, proxied.canceled, proxied.cancel_reason),
                         (direct.watch_id, direct.created, direct.canceled, direct.cancel_reason))
        self.assertTrue(direct.canceled)
        revision = self.p.kv.Put(R.PutRequest(key=key, value=b"again"), metadata=a).header.revision
        self.assertEqual([e.kv.mod_revision for e in watch_a.recv().events], [revision])
        watch_b.expect_nothing(0.5)

    def test_a_shared_watch_outlives_its_openers_token(self):
        key = b"/a/shared"
        opener = self.token("usera")
        first = self.stream(self.p.watch.Watch, metadata=opener)
        first.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
        self.assertTrue(first.recv().created)
        time.sleep(TOKEN_TTL + 1.5)  # the opener's token expires (unused)
        self.both_errors("kv", "Range", R.RangeRequest(key=key), grpc.StatusCode.UNAUTHENTICATED,
                         "etcdserver: invalid auth token", metadata=opener)
        others = []
        for user in ("usera", "root"):
            s = self.stream(self.p.watch.Watch, metadata=self.token(user))
            s.send(R.WatchRequest(create_request=R.WatchCreateRequest(key=key)))
            self.assertTrue(s.recv().created)
            others.append(s)
        revision = self.p.kv.Put(R.PutRequest(key=key, value=b"v"), metadata=self.token("root")).header.revision
        for s in [first] + others:
            self.assertEqual([e.kv.mod_revision for e in s.recv().events], [revision])

    def test_etcds_errors_and_root_operations(self):
        self.both_errors("auth", "Authenticate", R.AuthenticateRequest(name="usera", password="wrong"),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: authentication failed, invalid user ID or password")
        self.both_errors("kv", "Range", R.RangeRequest(key=b"/a/x"), grpc.StatusCode.INVALID_ARGUMENT,
                         "etcdserver: user name is empty")
        root = self.token("root")
        users = self.p.auth.UserList(R.AuthUserListRequest(), metadata=root).users
        self.assertEqual(sorted(users), sorted(PASSWORDS))
        self.both_errors("auth", "UserList", R.AuthUserListRequest(), grpc.StatusCode.PERMISSION_DENIED,
                         "etcdserver: permission denied", metadata=self.token("usera"))

    def test_no_secret_in_the_proxy_log(self):
        tokens = [dict(self.token(user))["token"] for user in PASSWORDS]
        for token in tokens:  # calls allowed and refused
            rpc_error_or_none(self.p.kv.Range, R.RangeRequest(key=b"/a/x"), metadata=(("token", token),))
        log = self.proxy.log()
        for secret in tokens + list(PASSWORDS.values()):
            self.assertNotIn(secret, log)
