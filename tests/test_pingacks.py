"""PING ACKs held for the next write (etcdproxy.grpc.pingacks), in memory."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from etcdproxy.grpc.pingacks import CONTROL_DELAY, HeldAcks, only_ping_acks

ACK = bytes.fromhex("000008060100000000") + b"abcdefgh"
PING = bytes.fromhex("000008060000000000") + b"abcdefgh"


class Released:
    def __init__(self, clock):
        self.held = HeldAcks(clock, self.release)
        self.written = []

    def release(self):
        self.written.append(self.held.with_output(b"", after=False))


class HeldAcksTests(unittest.TestCase):
    def test_only_ping_acks(self):
        self.assertTrue(only_ping_acks(ACK))
        self.assertTrue(only_ping_acks(ACK * 3))
        self.assertFalse(only_ping_acks(PING))
        self.assertFalse(only_ping_acks(ACK + PING))
        self.assertFalse(only_ping_acks(ACK + b"x"))

    def test_released_within_the_delay_by_one_timer_for_all_connections(self):
        clock = Clock()
        a, b = Released(clock), Released(clock)
        a.held.hold(ACK)
        clock.advance(CONTROL_DELAY / 2)
        b.held.hold(ACK)
        b.held.hold(ACK)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(CONTROL_DELAY / 2)
        self.assertEqual(a.written, [ACK])
        self.assertEqual(b.written, [ACK + ACK])
        self.assertEqual(clock.getDelayedCalls(), [])
        a.held.hold(ACK)  # a new round
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(CONTROL_DELAY)
        self.assertEqual(a.written, [ACK, ACK])

    def test_carried_by_output_is_not_released_again(self):
        clock = Clock()
        a = Released(clock)
        a.held.hold(ACK)
        self.assertEqual(a.held.with_output(b"answer", after=True), b"answer" + ACK)
        self.assertEqual(a.held.with_output(b"goaway", after=False), b"goaway")
        clock.advance(CONTROL_DELAY)
        self.assertEqual(a.written, [])
        a.held.hold(ACK)
        self.assertEqual(a.held.with_output(b"goaway", after=False), ACK + b"goaway")

    def two_holding(self):
        """A clock, and two connections on it holding an ACK each, one stopped."""
        clock = Clock()
        a, b = Released(clock), Released(clock)
        a.held.hold(ACK)
        b.held.hold(ACK)
        a.held.stop()
        return clock, a, b

    def test_stopped_connection_is_not_called(self):
        clock, a, b = self.two_holding()
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # b still waits
        clock.advance(CONTROL_DELAY)
        self.assertEqual(a.written, [])
        self.assertEqual(b.written, [ACK])

    def test_no_timer_left_once_every_connection_stopped(self):
        clock, a, b = self.two_holding()
        b.held.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_cancelled_timer_is_armed_again(self):
        # (trial cancels the timed calls a test leaves behind; the timer is shared)
        clock = Clock()
        a = Released(clock)
        a.held.hold(ACK)
        clock.getDelayedCalls()[0].cancel()
        b = Released(clock)
        b.held.hold(ACK)
        clock.advance(CONTROL_DELAY)
        self.assertEqual(b.written, [ACK])

    def test_a_failed_release_does_not_strand_the_others(self):
        clock = Clock()
        a, b = Released(clock), Released(clock)

        def broken():
            raise RuntimeError("write failed")
        a.held._release = broken
        a.held.hold(ACK)
        b.held.hold(ACK)
        clock.advance(CONTROL_DELAY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(b.written, [ACK])
        b.held.hold(ACK)  # b waits again, with a timer
        clock.advance(CONTROL_DELAY)
        self.assertEqual(b.written, [ACK, ACK])
