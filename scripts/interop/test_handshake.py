# Handshake and wire-format tests with a hand-rolled NBD client (raw sockets, no libnbd).
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_handshake.py   (QNBD=... to pick the server)
import os
import struct
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qnbdtest import *  # noqa: E402,F401,F403
import qnbdtest as T  # noqa: E402

NAME = "disk1"
DESC = "qnbd interop export \u2013 desc"
HEAD = T.pattern_bytes(1, 1 * MiB)          # data at [0, 1 MiB), then a hole up to 64 MiB
MID = T.pattern_bytes(2, 256 * KiB)          # data at [8 MiB, 8 MiB + 256 KiB)


class HandshakeBase(T.QnbdTestCase):
    export_name = NAME
    description = DESC
    read_only = False
    tcp = False

    def setUp(self):
        super().setUp()
        img = self.image(regions=[(0, HEAD), (8 * MiB, MID)])
        self.img = img
        self.srv = self.start_server(img, export_name=self.export_name,
                                     description=self.description, read_only=self.read_only,
                                     tcp=self.tcp)

    def client(self, flags=T.FLAG_C_FIXED_NEWSTYLE | T.FLAG_C_NO_ZEROES):
        c = self.raw(self.srv)
        c.start(flags)
        return c

    def assertReply(self, replies, rtype, what=""):
        got = replies[-1][0]
        self.assertEqual(got, rtype, "%s: got %s, expected %s" % (
            what, T.rep_name(got), T.rep_name(rtype)))

    def assertInSync(self, c):
        """The option loop is still usable: LIST answers with our export and ACK."""
        r = c.option(T.OPT_LIST)
        self.assertReply(r, T.REP_ACK, "LIST after previous option")
        names = [p[4:4 + struct.unpack(">I", p[:4])[0]].decode() for t, p in r[:-1]]
        self.assertEqual(names, [self.export_name])


class GreetingTests(HandshakeBase):
    def test_greeting_bytes(self):
        c = self.raw(self.srv)
        g = c.recv_exact(18)
        self.assertEqual(g[:8], b"NBDMAGIC")
        self.assertEqual(g[8:16], b"IHAVEOPT")
        self.assertEqual(struct.unpack(">H", g[16:])[0], T.FLAG_FIXED_NEWSTYLE | T.FLAG_NO_ZEROES)
        # nothing else before the client answers
        closed, extra = c.read_until_close(0.3)
        self.assertFalse(closed, "server closed the connection before the client flags")
        self.assertEqual(extra, b"")

    def test_unknown_client_flags_close_connection(self):
        for flags in (0x3 | 0x4, 0x80000003):
            with self.subTest(flags=hex(flags)):
                c = self.raw(self.srv)
                c.read_greeting()
                c.send_client_flags(flags)
                closed, data = c.read_until_close(5)
                self.assertTrue(closed, "connection not closed after client flags %#x" % flags)
                self.assertEqual(data, b"", "server sent data after unknown client flags")
        self.assertTrue(self.srv.alive())

    def test_export_name_without_no_zeroes_134_bytes(self):
        c = self.client(T.FLAG_C_FIXED_NEWSTYLE)
        data = c.export_name(NAME)
        self.assertEqual(len(data), 134)
        size, flags = struct.unpack(">QH", data[:10])
        self.assertEqual(size, 64 * MiB)
        self.assertEqual(flags, T.RW_FLAGS_NOSR, "transmission flags %#x" % flags)
        self.assertEqual(data[10:], bytes(124))
        # the stream is exactly in sync: a simple READ works right after
        rep = c.read(0, 4096)
        self.assertEqual(rep.kind, "simple")
        self.assertEqual(rep.error, 0)
        self.assertEqual(rep.data, HEAD[:4096])
        closed, extra = c.read_until_close(0.2)
        self.assertEqual(extra, b"", "extra bytes after the READ reply")

    def test_export_name_with_no_zeroes_10_bytes(self):
        c = self.client()
        data = c.export_name(NAME)
        self.assertEqual(len(data), 10)
        self.assertEqual(struct.unpack(">QH", data), (64 * MiB, T.RW_FLAGS_NOSR))
        rep = c.read(8 * MiB, 4096)
        self.assertEqual((rep.kind, rep.error), ("simple", 0))
        self.assertEqual(rep.data, MID[:4096])
        closed, extra = c.read_until_close(0.2)
        self.assertEqual(extra, b"", "extra bytes after the READ reply (were zeroes sent?)")

    def test_export_name_unknown_closes(self):
        c = self.client()
        c.send_option(T.OPT_EXPORT_NAME, b"no-such-export")
        closed, data = c.read_until_close(5)
        self.assertTrue(closed, "EXPORT_NAME for an unknown export must end the connection")
        self.assertEqual(data, b"")
        self.assertTrue(self.srv.alive())

    def test_abort_gets_ack_then_close(self):
        c = self.client()
        c.send_option(T.OPT_ABORT)
        opt, rtype, payload = c.read_option_reply()
        self.assertEqual((opt, rtype, payload), (T.OPT_ABORT, T.REP_ACK, b""))
        closed, data = c.read_until_close(5)
        self.assertTrue(closed)
        self.assertEqual(data, b"")


class OptionTests(HandshakeBase):
    def test_list_with_description(self):
        c = self.client()
        r = c.option(T.OPT_LIST)
        self.assertReply(r, T.REP_ACK)
        self.assertEqual(len(r), 2, "expected exactly one REP_SERVER before ACK: %r" % r)
        rtype, payload = r[0]
        self.assertEqual(rtype, T.REP_SERVER)
        n = struct.unpack(">I", payload[:4])[0]
        self.assertEqual(payload[4:4 + n].decode(), NAME)
        self.assertEqual(payload[4 + n:].decode(), DESC)
        self.assertEqual(r[1][1], b"", "ACK with payload")

    def test_list_with_payload_is_invalid_and_loop_continues(self):
        c = self.client()
        r = c.option(T.OPT_LIST, b"junk")
        self.assertEqual(len(r), 1, "only the error reply expected, got %r" % [x[0] for x in r])
        self.assertReply(r, T.REP_ERR_INVALID, "LIST with payload")
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.read(0, 512).data, HEAD[:512])

    def _check_infos(self, infos, flags):
        self.assertEqual(infos[T.INFO_EXPORT], (64 * MiB, flags),
                         "INFO_EXPORT (size, flags=%#x)" % infos[T.INFO_EXPORT][1])
        self.assertEqual(infos.get(T.INFO_NAME), NAME)
        self.assertEqual(infos.get(T.INFO_DESCRIPTION), DESC)
        self.assertEqual(infos.get(T.INFO_BLOCK_SIZE), (1, 4096, 32 * MiB))

    def test_info_name_description_block_size(self):
        c = self.client()
        r = c.option(T.OPT_INFO, T.info_payload(
            NAME, [T.INFO_NAME, T.INFO_DESCRIPTION, T.INFO_BLOCK_SIZE]))
        self.assertReply(r, T.REP_ACK, "INFO")
        self._check_infos(T.parse_infos(r[:-1]), T.RW_FLAGS_NOSR)
        # INFO does not end the option loop
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.read(4096, 4096).data, HEAD[4096:8192])

    def test_info_after_structured_reply_advertises_df(self):
        c = self.client()
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        infos = c.go(NAME, [T.INFO_NAME, T.INFO_DESCRIPTION, T.INFO_BLOCK_SIZE], opt=T.OPT_INFO)
        self._check_infos(infos, T.RW_FLAGS_SR)

    def test_go_name_description_block_size(self):
        c = self.client()
        r = c.option(T.OPT_GO, T.info_payload(
            NAME, [T.INFO_NAME, T.INFO_DESCRIPTION, T.INFO_BLOCK_SIZE]))
        self.assertReply(r, T.REP_ACK, "GO")
        self._check_infos(T.parse_infos(r[:-1]), T.RW_FLAGS_NOSR)
        rep = c.read(1 * MiB - 512, 1024)      # spans data and hole
        self.assertEqual(rep.kind, "simple")
        self.assertEqual(rep.data, HEAD[-512:] + bytes(512))

    def test_go_without_info_requests_sends_export_info(self):
        c = self.client()
        r = c.option(T.OPT_GO, T.info_payload(NAME, []))
        self.assertReply(r, T.REP_ACK, "GO")
        infos = T.parse_infos(r[:-1])
        self.assertEqual(infos[T.INFO_EXPORT], (64 * MiB, T.RW_FLAGS_NOSR))
        self.assertEqual(c.read(0, 16).data, HEAD[:16])

    def test_go_unknown_export_then_loop_continues(self):
        c = self.client()
        for opt in (T.OPT_INFO, T.OPT_GO):
            r = c.option(opt, T.info_payload("no-such-export", [T.INFO_BLOCK_SIZE]))
            self.assertEqual(len(r), 1, "unexpected replies before the error: %r" % r)
            self.assertReply(r, T.REP_ERR_UNKNOWN, "option %d for unknown export" % opt)
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.read(0, 512).data, HEAD[:512])

    def test_go_malformed_payload_invalid(self):
        c = self.client()
        # name length claims more bytes than the option carries
        r = c.option(T.OPT_GO, struct.pack(">I", 100) + b"disk")
        self.assertReply(r, T.REP_ERR_INVALID, "GO with truncated name")
        self.assertInSync(c)

    def test_structured_reply_twice(self):
        c = self.client()
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        r = c.option(T.OPT_STRUCTURED_REPLY)
        self.assertReply(r, T.REP_ERR_INVALID, "second STRUCTURED_REPLY")
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.tflags, T.RW_FLAGS_SR)
        rep = c.read(0, 4096)
        self.assertEqual(rep.kind, "structured")
        self.assertEqual(rep.data, HEAD[:4096])

    def test_structured_reply_with_payload_invalid(self):
        c = self.client()
        r = c.option(T.OPT_STRUCTURED_REPLY, b"x")
        self.assertReply(r, T.REP_ERR_INVALID, "STRUCTURED_REPLY with payload")
        self.assertInSync(c)

    def test_set_meta_context_before_structured_reply_invalid(self):
        c = self.client()
        r = c.option(T.OPT_SET_META_CONTEXT, T.meta_payload(NAME, ["base:allocation"]))
        self.assertEqual(len(r), 1, "no META_CONTEXT expected: %r" % r)
        self.assertReply(r, T.REP_ERR_INVALID, "SET_META_CONTEXT before STRUCTURED_REPLY")
        self.assertInSync(c)

    def _meta(self, c, opt, queries):
        r = c.option(opt, T.meta_payload(NAME, queries))
        self.assertReply(r, T.REP_ACK, "meta context option %d %r" % (opt, queries))
        out = []
        for rtype, payload in r[:-1]:
            self.assertEqual(rtype, T.REP_META_CONTEXT)
            out.append((struct.unpack(">I", payload[:4])[0], payload[4:].decode()))
        return out

    def test_list_meta_context(self):
        c = self.client()
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        got = self._meta(c, T.OPT_LIST_META_CONTEXT, ["base:allocation"])
        self.assertEqual([n for i, n in got], ["base:allocation"])
        # proto.md: "The metadata context ID in these replies is reserved and SHOULD be set to zero"
        self.assertEqual([i for i, n in got], [0])
        # raw files have no allocation depth: not offered, not an error
        self.assertEqual(self._meta(c, T.OPT_LIST_META_CONTEXT, ["qemu:allocation-depth"]), [])
        # unknown namespaces are ignored
        self.assertEqual(self._meta(c, T.OPT_LIST_META_CONTEXT, ["x-nosuch:thing"]), [])
        got = self._meta(c, T.OPT_LIST_META_CONTEXT,
                         ["x-nosuch:thing", "base:allocation", "qemu:allocation-depth"])
        self.assertEqual([n for i, n in got], ["base:allocation"])
        # zero queries = everything the export offers
        listed = self._meta(c, T.OPT_LIST_META_CONTEXT, [])
        self.assertEqual({i for i, n in listed}, {0}, "LIST_META_CONTEXT ids must be 0: %r" % listed)
        names = [n for i, n in listed]
        self.assertIn("base:allocation", names)
        self.assertNotIn("qemu:allocation-depth", names)
        self.assertInSync(c)

    def test_set_meta_context_and_block_status(self):
        c = self.client()
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        self.assertEqual(self._meta(c, T.OPT_SET_META_CONTEXT, []), [],
                         "SET with zero queries selects nothing")
        got = self._meta(c, T.OPT_SET_META_CONTEXT,
                         ["x-nosuch:thing", "base:allocation", "qemu:allocation-depth"])
        self.assertEqual([n for i, n in got], ["base:allocation"])
        cid = got[0][0]
        c.go(NAME)
        expected = T.file_map(self.img)
        for off, length, flags in [(0, 4 * MiB, 0), (512 * KiB, 8 * MiB, 0),
                                   (8 * MiB - 4096, 1 * MiB, 0),
                                   (0, 4 * MiB, T.CMD_FLAG_REQ_ONE),
                                   (2 * MiB, 64 * KiB, T.CMD_FLAG_REQ_ONE)]:
            with self.subTest(off=off, length=length, flags=flags):
                rep = c.command(T.CMD_BLOCK_STATUS, off, length, flags)
                self.assertEqual(rep.error, 0)
                self.assertEqual(rep.kind, "structured")
                st = T.parse_block_status(rep.chunks, False)
                self.assertEqual(list(st), [cid])
                ext = st[cid]
                if flags & T.CMD_FLAG_REQ_ONE:
                    self.assertEqual(len(ext), 1, "REQ_ONE must give exactly one extent")
                    self.assertLessEqual(ext[0][0], length)
                pos = off
                for elen, eflags in ext:
                    self.assertGreater(elen, 0)
                    if pos >= off + length:
                        self.fail("extent beyond the request end")
                    want, region_end = T.flags_at(expected, pos)
                    self.assertEqual(eflags, want, "flags at %d" % pos)
                    self.assertLessEqual(min(pos + elen, off + length), region_end,
                                         "extent at %d crosses an allocation boundary" % pos)
                    pos += elen

    def test_starttls_policy(self):
        c = self.client()
        r = c.option(T.OPT_STARTTLS)
        self.assertReply(r, T.REP_ERR_POLICY, "STARTTLS without TLS configured")
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.read(0, 512).data, HEAD[:512])

    def test_unknown_option_unsup_and_loop_continues(self):
        c = self.client()
        for opt, payload in [(99, b""), (99, b"abc"), (4, b""), (0x7FFF, bytes(60000))]:
            with self.subTest(opt=opt, length=len(payload)):
                r = c.option(opt, payload)
                self.assertEqual(len(r), 1)
                self.assertReply(r, T.REP_ERR_UNSUP, "option %d" % opt)
        self.assertInSync(c)
        c.go(NAME)
        self.assertEqual(c.read(8 * MiB, 512).data, MID[:512])

    def test_oversized_option_closes_connection(self):
        for opt, length in [(T.OPT_GO, 1 * MiB), (99, 0x7FFFFFFF), (T.OPT_LIST, 64 * KiB + 1024)]:
            with self.subTest(opt=opt, length=length):
                c = self.client()
                c.send_option(opt, b"\0" * 16, length=length)   # header + a little payload
                closed, data = c.read_until_close(5)
                self.assertTrue(closed, "option %d with length %d did not close the connection"
                                % (opt, length))
        self.assertTrue(self.srv.alive())
        c = self.client()
        self.assertInSync(c)


class ExtendedHeaderTests(HandshakeBase):
    def test_extended_headers(self):
        c = self.client()
        self.assertEqual(c.extended_headers(), T.REP_ACK, "EXTENDED_HEADERS not acknowledged")
        r = c.option(T.OPT_SET_META_CONTEXT, T.meta_payload(NAME, ["base:allocation"]))
        self.assertReply(r, T.REP_ACK)
        self.assertEqual(len(r), 2)
        cid = struct.unpack(">I", r[0][1][:4])[0]
        c.go(NAME)
        self.assertEqual(c.tflags & T.RW_FLAGS_SR, T.RW_FLAGS_SR, "flags %#x" % c.tflags)
        self.assertEqual(c.size, 64 * MiB)

        # READ: 32-byte request, 32-byte extended reply chunks
        rep = c.read(4096, 8192)
        self.assertEqual((rep.kind, rep.error), ("extended", 0))
        self.assertEqual(rep.data, HEAD[4096:4096 + 8192])
        self.assertEqual(set(rep.header_offsets), {4096}, "reply header offset must echo request")

        # WRITE with PAYLOAD_LEN
        payload = T.pattern_bytes(3, 12288)
        rep = c.write(2 * MiB + 100, payload)
        self.assertEqual((rep.kind, rep.error), ("extended", 0))
        self.assertEqual(rep.header_offsets, [2 * MiB + 100])
        self.assertEqual(rep.chunks[-1][0] & T.REPLY_FLAG_DONE, 1)
        rep = c.read(2 * MiB, 16384)
        self.assertEqual(rep.data, bytes(100) + payload + bytes(16384 - 100 - 12288))
        self.assertEqual(T.read_file(self.img, 2 * MiB + 100, 12288), payload)

        # FLUSH and friends also answer with extended replies
        for cmd in (T.CMD_FLUSH, T.CMD_CACHE):
            rep = c.command(cmd, 0, 0 if cmd == T.CMD_FLUSH else 65536)
            self.assertEqual((rep.kind, rep.error), ("extended", 0), "cmd %d" % cmd)

        # BLOCK_STATUS -> BLOCK_STATUS_EXT (64-bit lengths and flags)
        rep = c.command(T.CMD_BLOCK_STATUS, 0, 16 * MiB)
        self.assertEqual((rep.kind, rep.error), ("extended", 0))
        st = T.parse_block_status(rep.chunks, True)
        self.assertEqual(list(st), [cid])
        expected = T.file_map(self.img)
        pos = 0
        for elen, eflags in st[cid]:
            self.assertLess(pos, 16 * MiB)
            want, region_end = T.flags_at(expected, pos)
            self.assertEqual(eflags, want, "flags at %d" % pos)
            self.assertLessEqual(min(pos + elen, 16 * MiB), region_end)
            pos += elen

        # an error is an extended ERROR chunk
        rep = c.command(T.CMD_READ, 64 * MiB, 512)
        self.assertEqual(rep.kind, "extended")
        self.assertEqual(rep.error, T.NBD_EINVAL)
        # and the connection is still good
        self.assertEqual(c.read(0, 512).data, HEAD[:512])
        c.disconnect()
        self.assertTrue(c.read_until_close(5)[0])


    def _extended_client(self):
        c = self.client()
        self.assertEqual(c.extended_headers(), T.REP_ACK)
        c.go(NAME)
        return c

    def test_extended_write_without_payload_len_has_no_payload(self):
        # proto.md (extended headers): if PAYLOAD_LEN "is absent (there is no payload, and *length*
        # instead is an effect length ...)". So the READ sent right behind such a WRITE is the next
        # request, not payload bytes: the WRITE gets EINVAL and the READ its data.
        c = self._extended_client()
        w = c.send_request(T.CMD_WRITE, 0, 512)
        r = c.send_request(T.CMD_READ, 4096, 512)
        replies = {}
        for _ in range(2):
            rep = c.read_reply(512)
            replies[rep.cookie] = rep
        self.assertEqual(replies[w].error, T.NBD_EINVAL)
        self.assertEqual(replies[r].error, 0)
        self.assertEqual(T.assemble_read(replies[r].chunks, 4096, 512), HEAD[4096:4096 + 512])
        self.assertEqual(T.read_file(self.img, 0, 512), HEAD[:512], "the WRITE must not have written")
        self.assertEqual(c.read(0, 512).data, HEAD[:512])

    def test_oversize_payload_len_is_a_hard_disconnect(self):
        # "A server SHOULD initiate hard disconnect if a client sets the NBD_CMD_FLAG_PAYLOAD_LEN flag and
        # uses a *length* larger than a server's advertised ... maximum payload length"
        c = self._extended_client()
        c.send_request(T.CMD_WRITE, 0, 32 * MiB + 512, T.CMD_FLAG_PAYLOAD_LEN)
        closed, data = c.read_until_close(5)
        self.assertTrue(closed, "an oversize PAYLOAD_LEN must close the connection")
        self.assertEqual(data, b"", "no reply before the disconnect")
        self.assertTrue(self.srv.alive())
        self.assertEqual(self.client().go(NAME)[T.INFO_EXPORT][0], 64 * MiB)


class TransmissionTests(HandshakeBase):
    def test_simple_replies_echo_cookies(self):
        c = self.client()
        c.go(NAME)
        cookies = [0xDEADBEEFCAFEF00D, 0, 0xFFFFFFFFFFFFFFFF, 0x0102030405060708]
        data = T.pattern_bytes(4, 4096)
        c.send_request(T.CMD_WRITE, 16 * MiB, 4096, 0, data, cookie=cookies[0])
        c.send_request(T.CMD_FLUSH, cookie=cookies[1])
        c.send_request(T.CMD_READ, 64 * MiB - 512, 1024, cookie=cookies[2])   # past end
        c.send_request(T.CMD_WRITE_ZEROES, 16 * MiB + 1024, 512, cookie=cookies[3])
        seen = {}
        for _ in cookies:
            rep = c.read_reply(0)
            self.assertEqual(rep.kind, "simple")
            self.assertNotIn(rep.cookie, seen, "duplicate reply")
            seen[rep.cookie] = rep.error
        self.assertEqual(seen, {cookies[0]: 0, cookies[1]: 0, cookies[2]: T.NBD_EINVAL,
                                cookies[3]: 0})
        rep = c.read(16 * MiB, 4096)
        self.assertEqual(rep.data, data[:1024] + bytes(512) + data[1536:])

    def test_structured_read_chunks(self):
        c = self.client()
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        c.go(NAME)
        rep = c.read(1 * MiB - 4096, 2 * MiB)           # data then hole
        self.assertEqual((rep.kind, rep.error), ("structured", 0))
        self.assertEqual(rep.data, HEAD[-4096:] + bytes(2 * MiB - 4096))
        self.assertTrue(rep.chunks[-1][0] & T.REPLY_FLAG_DONE)
        # DF: a single content chunk
        rep = c.read(1 * MiB - 4096, 64 * KiB, T.CMD_FLAG_DF)
        self.assertEqual(rep.error, 0)
        content = [ch for ch in rep.chunks if ch[1] != T.REPLY_TYPE_NONE]
        self.assertEqual(len(content), 1, "DF read fragmented into %d chunks" % len(content))
        self.assertEqual(rep.data, HEAD[-4096:] + bytes(60 * KiB))
        # errors are ERROR chunks with the right number
        rep = c.command(T.CMD_READ, 64 * MiB - 512, 1024)
        self.assertEqual(rep.kind, "structured")
        self.assertEqual(rep.error, T.NBD_EINVAL)
        self.assertIn(rep.chunks[-1][1], (T.REPLY_TYPE_ERROR, T.REPLY_TYPE_ERROR_OFFSET))
        self.assertEqual(c.read(0, 512).data, HEAD[:512])

    def test_disc_closes_connection_server_stays(self):
        c = self.client()
        c.go(NAME)
        c.write(0, b"\x5a" * 512)
        c.disconnect()
        closed, data = c.read_until_close(5)
        self.assertTrue(closed)
        self.assertEqual(data, b"")
        self.assertEqual(T.read_file(self.img, 0, 512), b"\x5a" * 512)
        c2 = self.client()
        c2.go(NAME)
        self.assertEqual(c2.read(0, 512).data, b"\x5a" * 512)


class DefaultExportTests(HandshakeBase):
    export_name = ""
    description = None

    def test_default_export_list_and_go(self):
        c = self.client()
        r = c.option(T.OPT_LIST)
        self.assertReply(r, T.REP_ACK)
        self.assertEqual(len(r), 2)
        self.assertEqual(r[0][1][:4], b"\0\0\0\0", "empty export name expected")
        infos = c.go("", [T.INFO_BLOCK_SIZE])
        self.assertEqual(infos[T.INFO_EXPORT][0], 64 * MiB)
        self.assertEqual(c.read(0, 512).data, HEAD[:512])


class ReadOnlyHandshakeTests(HandshakeBase):
    read_only = True

    def test_read_only_flags(self):
        c = self.client()
        infos = c.go(NAME, [], opt=T.OPT_INFO)
        self.assertEqual(infos[T.INFO_EXPORT], (64 * MiB, T.RO_FLAGS_NOSR),
                         "flags %#x" % infos[T.INFO_EXPORT][1])
        self.assertEqual(c.structured_reply(), T.REP_ACK)
        c.go(NAME)
        self.assertEqual(c.tflags, T.RO_FLAGS_SR, "flags %#x" % c.tflags)
        rep = c.write(0, b"x" * 512)
        self.assertEqual(rep.error, T.NBD_EPERM)
        self.assertEqual(T.read_file(self.img, 0, 512), HEAD[:512])


class TcpHandshakeTests(HandshakeBase):
    tcp = True

    def test_tcp_go_and_read(self):
        c = self.client()
        self.assertEqual(c.handshake_flags, 3)
        c.go(NAME)
        self.assertEqual(c.read(8 * MiB, 65536).data, MID[:65536])

    def test_nbd_client_list(self):
        # the kernel client's handshake code (nbd-client 3.24), list mode needs no /dev/nbd*
        p = T.run(["nbd-client", "-l", "127.0.0.1", str(self.srv.port)], timeout=20, check=False)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # one line per export: "name" or "name: description"
        lines = [l.strip() for l in p.stdout.splitlines()]
        self.assertIn("%s: %s" % (NAME, DESC), lines, p.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)
