/* Prints sizes, member offsets and constants of the libibverbs structs stolon-verbs mirrors.
 * Compiled and run by tests/abi_layout.rs when the rdma-core headers are installed. */
#include <stddef.h>
#include <stdio.h>
#include <infiniband/verbs.h>

#define S(t) printf(#t ".SIZEOF %zu\n", sizeof(struct t))
#define U(t) printf(#t ".SIZEOF %zu\n", sizeof(union t))
#define O(t, m) printf(#t "." #m " %zu\n", offsetof(struct t, m))
#define C(k) printf(#k " %lld\n", (long long)(k))

int main(void) {
    U(ibv_gid);
    S(ibv_gid_entry); O(ibv_gid_entry, gid); O(ibv_gid_entry, gid_index);
    O(ibv_gid_entry, port_num); O(ibv_gid_entry, gid_type); O(ibv_gid_entry, ndev_ifindex);

    S(ibv_device_attr); O(ibv_device_attr, node_guid); O(ibv_device_attr, max_mr_size);
    O(ibv_device_attr, vendor_id); O(ibv_device_attr, max_qp_wr);
    O(ibv_device_attr, device_cap_flags); O(ibv_device_attr, max_sge);
    O(ibv_device_attr, max_cqe); O(ibv_device_attr, max_qp_rd_atom);
    O(ibv_device_attr, max_qp_init_rd_atom); O(ibv_device_attr, atomic_cap);
    O(ibv_device_attr, max_srq_wr); O(ibv_device_attr, max_srq_sge);
    O(ibv_device_attr, max_pkeys); O(ibv_device_attr, local_ca_ack_delay);
    O(ibv_device_attr, phys_port_cnt);

    S(ibv_port_attr); O(ibv_port_attr, state); O(ibv_port_attr, max_mtu);
    O(ibv_port_attr, active_mtu); O(ibv_port_attr, gid_tbl_len);
    O(ibv_port_attr, port_cap_flags); O(ibv_port_attr, max_msg_sz);
    O(ibv_port_attr, pkey_tbl_len); O(ibv_port_attr, lid); O(ibv_port_attr, sm_lid);
    O(ibv_port_attr, lmc); O(ibv_port_attr, active_width); O(ibv_port_attr, active_speed);
    O(ibv_port_attr, phys_state); O(ibv_port_attr, link_layer); O(ibv_port_attr, flags);
    O(ibv_port_attr, port_cap_flags2);

    S(ibv_sge); O(ibv_sge, addr); O(ibv_sge, length); O(ibv_sge, lkey);
    S(ibv_send_wr); O(ibv_send_wr, wr_id); O(ibv_send_wr, next); O(ibv_send_wr, sg_list);
    O(ibv_send_wr, num_sge); O(ibv_send_wr, opcode); O(ibv_send_wr, send_flags);
    O(ibv_send_wr, imm_data); O(ibv_send_wr, wr); O(ibv_send_wr, wr.rdma.remote_addr);
    O(ibv_send_wr, wr.rdma.rkey); O(ibv_send_wr, wr.atomic.rkey); O(ibv_send_wr, wr.ud.remote_qkey);
    O(ibv_send_wr, qp_type.xrc.remote_srqn); O(ibv_send_wr, bind_mw); O(ibv_send_wr, tso);
    O(ibv_send_wr, bind_mw.bind_info.mw_access_flags);
    S(ibv_recv_wr); O(ibv_recv_wr, next); O(ibv_recv_wr, sg_list); O(ibv_recv_wr, num_sge);

    S(ibv_wc); O(ibv_wc, wr_id); O(ibv_wc, status); O(ibv_wc, opcode); O(ibv_wc, vendor_err);
    O(ibv_wc, byte_len); O(ibv_wc, imm_data); O(ibv_wc, qp_num); O(ibv_wc, src_qp);
    O(ibv_wc, wc_flags); O(ibv_wc, pkey_index); O(ibv_wc, slid); O(ibv_wc, sl);
    O(ibv_wc, dlid_path_bits);

    S(ibv_qp_cap); O(ibv_qp_cap, max_recv_wr); O(ibv_qp_cap, max_inline_data);
    S(ibv_qp_init_attr); O(ibv_qp_init_attr, send_cq); O(ibv_qp_init_attr, srq);
    O(ibv_qp_init_attr, cap); O(ibv_qp_init_attr, qp_type); O(ibv_qp_init_attr, sq_sig_all);
    S(ibv_global_route); O(ibv_global_route, flow_label); O(ibv_global_route, sgid_index);
    O(ibv_global_route, hop_limit); O(ibv_global_route, traffic_class);
    S(ibv_ah_attr); O(ibv_ah_attr, dlid); O(ibv_ah_attr, sl); O(ibv_ah_attr, src_path_bits);
    O(ibv_ah_attr, static_rate); O(ibv_ah_attr, is_global); O(ibv_ah_attr, port_num);
    S(ibv_qp_attr); O(ibv_qp_attr, qp_state); O(ibv_qp_attr, path_mtu); O(ibv_qp_attr, qkey);
    O(ibv_qp_attr, rq_psn); O(ibv_qp_attr, sq_psn); O(ibv_qp_attr, dest_qp_num);
    O(ibv_qp_attr, qp_access_flags); O(ibv_qp_attr, cap); O(ibv_qp_attr, ah_attr);
    O(ibv_qp_attr, alt_ah_attr); O(ibv_qp_attr, pkey_index); O(ibv_qp_attr, en_sqd_async_notify);
    O(ibv_qp_attr, max_rd_atomic); O(ibv_qp_attr, max_dest_rd_atomic);
    O(ibv_qp_attr, min_rnr_timer); O(ibv_qp_attr, port_num); O(ibv_qp_attr, timeout);
    O(ibv_qp_attr, retry_cnt); O(ibv_qp_attr, rnr_retry); O(ibv_qp_attr, alt_timeout);
    O(ibv_qp_attr, rate_limit);
    S(ibv_srq_attr); O(ibv_srq_attr, max_sge); O(ibv_srq_attr, srq_limit);
    S(ibv_srq_init_attr); O(ibv_srq_init_attr, attr);

    S(ibv_device); O(ibv_device, node_type); O(ibv_device, name); O(ibv_device, dev_name);
    O(ibv_device, dev_path); O(ibv_device, ibdev_path);
    S(ibv_context_ops); O(ibv_context_ops, poll_cq); O(ibv_context_ops, post_srq_recv);
    O(ibv_context_ops, post_send); O(ibv_context_ops, post_recv);
    O(ibv_context_ops, _compat_async_event);
    S(ibv_context); O(ibv_context, ops); O(ibv_context, cmd_fd); O(ibv_context, num_comp_vectors);
    O(ibv_context, mutex); O(ibv_context, abi_compat);
    S(verbs_context); O(verbs_context, query_port); O(verbs_context, sz);
    O(verbs_context, context);
    S(ibv_pd); O(ibv_pd, handle);
    S(ibv_mr); O(ibv_mr, addr); O(ibv_mr, length); O(ibv_mr, lkey); O(ibv_mr, rkey);
    S(ibv_cq); O(ibv_cq, cqe); O(ibv_cq, mutex); O(ibv_cq, cond); O(ibv_cq, async_events_completed);
    S(ibv_srq); O(ibv_srq, handle); O(ibv_srq, mutex); O(ibv_srq, events_completed);
    S(ibv_qp); O(ibv_qp, srq); O(ibv_qp, qp_num); O(ibv_qp, state); O(ibv_qp, qp_type);
    O(ibv_qp, mutex); O(ibv_qp, events_completed);

    C(IBV_GID_TYPE_IB); C(IBV_GID_TYPE_ROCE_V1); C(IBV_GID_TYPE_ROCE_V2);
    C(IBV_MTU_256); C(IBV_MTU_1024); C(IBV_MTU_4096);
    C(IBV_PORT_DOWN); C(IBV_PORT_ACTIVE); C(IBV_PORT_ACTIVE_DEFER);
    C(IBV_LINK_LAYER_UNSPECIFIED); C(IBV_LINK_LAYER_INFINIBAND); C(IBV_LINK_LAYER_ETHERNET);
    C(IBV_QPF_GRH_REQUIRED);
    C(IBV_WC_SUCCESS); C(IBV_WC_LOC_LEN_ERR); C(IBV_WC_LOC_PROT_ERR); C(IBV_WC_WR_FLUSH_ERR);
    C(IBV_WC_REM_INV_REQ_ERR); C(IBV_WC_REM_ACCESS_ERR); C(IBV_WC_REM_OP_ERR);
    C(IBV_WC_RETRY_EXC_ERR); C(IBV_WC_RNR_RETRY_EXC_ERR); C(IBV_WC_FATAL_ERR);
    C(IBV_WC_RESP_TIMEOUT_ERR); C(IBV_WC_GENERAL_ERR); C(IBV_WC_TM_RNDV_INCOMPLETE);
    C(IBV_WC_SEND); C(IBV_WC_RDMA_WRITE); C(IBV_WC_RECV); C(IBV_WC_RECV_RDMA_WITH_IMM);
    C(IBV_WC_GRH); C(IBV_WC_WITH_IMM);
    C(IBV_ACCESS_LOCAL_WRITE); C(IBV_ACCESS_REMOTE_WRITE); C(IBV_ACCESS_REMOTE_READ);
    C(IBV_ACCESS_REMOTE_ATOMIC); C(IBV_ACCESS_RELAXED_ORDERING); C(IBV_ACCESS_OPTIONAL_RANGE);
    C(IBV_QPT_RC);
    C(IBV_QP_STATE); C(IBV_QP_ACCESS_FLAGS); C(IBV_QP_PKEY_INDEX); C(IBV_QP_PORT); C(IBV_QP_AV);
    C(IBV_QP_PATH_MTU); C(IBV_QP_TIMEOUT); C(IBV_QP_RETRY_CNT); C(IBV_QP_RNR_RETRY);
    C(IBV_QP_RQ_PSN); C(IBV_QP_MAX_QP_RD_ATOMIC); C(IBV_QP_MIN_RNR_TIMER); C(IBV_QP_SQ_PSN);
    C(IBV_QP_MAX_DEST_RD_ATOMIC); C(IBV_QP_DEST_QPN); C(IBV_QP_RATE_LIMIT);
    C(IBV_QPS_RESET); C(IBV_QPS_INIT); C(IBV_QPS_RTR); C(IBV_QPS_RTS); C(IBV_QPS_ERR);
    C(IBV_WR_RDMA_WRITE); C(IBV_WR_RDMA_WRITE_WITH_IMM); C(IBV_WR_SEND); C(IBV_WR_SEND_WITH_IMM);
    C(IBV_SEND_SIGNALED); C(IBV_SEND_INLINE); C(IBV_SEND_FENCE);
    return 0;
}
