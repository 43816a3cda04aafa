/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sk_msg.c - sk_msg_accel, attached to tp_accel (--ebpf-accelerate): a sendmsg() on a
 * captured application socket, or on the proxy's socket for it, is moved straight to the
 * peer socket's receive queue, skipping TCP, IP and loopback for bytes that never leave
 * the host. Nothing else changes: connect4/6 still decided the redirect, the proxy still
 * asks SO_ORIGINAL_DST, FIN and RST still travel through TCP.
 *
 * Overhead: one sk_storage read, one sockhash lookup and a per-CPU counter (a hash
 * lookup) per sendmsg;
 * it runs only for sockets in tp_accel (sock_ops puts them there), nothing else.
 */
#include "tproxy_accel.h"

int sk_msg_accel(struct sk_msg_md *msg)
{
	struct tp_sock_key peer = {};
	struct bpf_sock *sk = msg->sk;
	u32 *state;
	long verdict;
	u64 netns;

	if (!sk)
		return SK_PASS;
	state = tp_sk_accel.sk_storage_get(sk, 0, 0);
	if (!state || *state != TP_ACCEL_ON)
		return SK_PASS;
	/* Both ends are in one namespace; sk_msg has its cookie from 5.15, which
	 * acceleration needs anyway (sock_ops.c). */
	netns = bpf_get_netns_cookie(msg);
	tp_peer_key_from_msg(&peer, msg, netns);
	verdict = tp_accel.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		tp_accel_count(netns, TP_A_MSG_REDIRECTED);
		return SK_PASS;
	}
	/* The peer is not (or no longer) there: TCP carries this message, and every later
	 * one, so that the peer never reads them out of order. */
	*state = TP_ACCEL_TCP;
	tp_accel_count(netns, TP_A_MSG_TCP);
	return SK_PASS;
}
