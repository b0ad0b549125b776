/* Prints sizes and member offsets of the libfabric 1.17 structs that fabric-lib mirrors.
 * Compiled and run by tests/abi_layout.rs when the libfabric headers are installed. */
#include <stddef.h>
#include <stdio.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_eq.h>

#define S(t) printf(#t ".SIZEOF %zu\n", sizeof(struct t))
#define O(t, m) printf(#t "." #m " %zu\n", offsetof(struct t, m))

int main(void) {
    S(fi_info); O(fi_info, caps); O(fi_info, addr_format); O(fi_info, src_addrlen);
    O(fi_info, handle); O(fi_info, tx_attr); O(fi_info, domain_attr); O(fi_info, fabric_attr);
    O(fi_info, nic);
    S(fi_tx_attr); O(fi_tx_attr, inject_size); O(fi_tx_attr, size); O(fi_tx_attr, tclass);
    S(fi_rx_attr); O(fi_rx_attr, size);
    S(fi_ep_attr); O(fi_ep_attr, max_msg_size); O(fi_ep_attr, auth_key);
    S(fi_domain_attr); O(fi_domain_attr, name); O(fi_domain_attr, threading);
    O(fi_domain_attr, mr_mode); O(fi_domain_attr, cq_data_size); O(fi_domain_attr, caps);
    O(fi_domain_attr, auth_key); O(fi_domain_attr, mr_cnt); O(fi_domain_attr, tclass);
    S(fi_fabric_attr); O(fi_fabric_attr, prov_name); O(fi_fabric_attr, api_version);
    O(fi_ops, close); O(fi_ops, bind); O(fi_ops, control);
    S(fid); O(fid, ops);
    O(fi_ops_fabric, domain); O(fid_fabric, ops);
    S(fi_cq_attr); O(fi_cq_attr, format); O(fi_cq_attr, wait_set);
    S(fi_av_attr); O(fi_av_attr, count); O(fi_av_attr, flags);
    O(fi_ops_domain, av_open); O(fi_ops_domain, cq_open); O(fi_ops_domain, endpoint);
    O(fi_ops_mr, reg); O(fid_domain, ops); O(fid_domain, mr);
    S(fid_mr); O(fid_mr, mem_desc); O(fid_mr, key);
    O(fi_ops_av, insert); O(fi_ops_av, remove); O(fid_av, ops);
    S(fi_cq_data_entry); O(fi_cq_data_entry, data);
    S(fi_cq_err_entry); O(fi_cq_err_entry, err); O(fi_cq_err_entry, prov_errno);
    O(fi_cq_err_entry, err_data);
    O(fi_ops_cq, read); O(fi_ops_cq, readerr); O(fi_ops_cq, strerror); O(fid_cq, ops);
    O(fi_ops_cm, getname);
    O(fi_ops_msg, recv); O(fi_ops_msg, send);
    O(fi_ops_rma, write); O(fi_ops_rma, writedata); O(fi_ops_rma, writemsg);
    S(fi_msg_rma); O(fi_msg_rma, addr); O(fi_msg_rma, rma_iov); O(fi_msg_rma, data);
    S(fi_rma_iov); O(fi_rma_iov, key); O(fi_ops_fabric, trywait);
    O(fid_ep, ops); O(fid_ep, cm); O(fid_ep, msg); O(fid_ep, rma);
    S(fi_mr_attr); O(fi_mr_attr, access); O(fi_mr_attr, requested_key); O(fi_mr_attr, iface);
    O(fi_mr_attr, device); O(fi_ops_mr, regattr);
    printf("FI_HMEM_CUDA %d\n", (int)FI_HMEM_CUDA);
    printf("FI_ENABLE %d\n", (int)FI_ENABLE);
    printf("FI_GETWAIT %d\n", (int)FI_GETWAIT);
    printf("FI_WAIT_FD %d\n", (int)FI_WAIT_FD);
    printf("FI_DELIVERY_COMPLETE %llu\n", (unsigned long long)FI_DELIVERY_COMPLETE);
    printf("FI_COMPLETION %llu\n", (unsigned long long)FI_COMPLETION);
    printf("FI_EAVAIL %d\n", (int)FI_EAVAIL);
    printf("FI_ENOKEY %d\n", (int)FI_ENOKEY);
    return 0;
}
