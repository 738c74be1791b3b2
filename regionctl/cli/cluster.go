package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// eachReplica calls every configured replica directly (not the leader).
func eachReplica(ctx context.Context, o *options, call func(context.Context, string, rootkmsv1.RootKMSClient) error) error {
	addrs := o.rootAddrs()
	if len(addrs) == 0 {
		return fmt.Errorf("no root KMS addresses (give --rootkms or rootkms in the config file)")
	}
	src, err := o.source()
	if err != nil {
		return err
	}
	var errs []error
	for _, addr := range addrs {
		c := rootkmsclient.New(src, []string{addr})
		cctx, cancel := context.WithTimeout(ctx, o.timeout)
		err := c.Do(cctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) error { return call(ctx, addr, rc) })
		cancel()
		c.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", addr, err))
		}
	}
	return errors.Join(errs...)
}

func clusterStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("cluster status", stderr, withJSON)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	var all []*rootkmsv1.ClusterStatus
	err := eachReplica(ctx, o, func(ctx context.Context, addr string, c rootkmsv1.RootKMSClient) error {
		st, err := c.GetClusterStatus(ctx, &rootkmsv1.GetClusterStatusRequest{})
		if err != nil {
			return err
		}
		all = append(all, st)
		if o.json {
			return printJSON(stdout, st)
		}
		fmt.Fprintf(stdout, "%s: %s %s, leader %s (%s), term %d, commit %d, applied %d, snapshot %d, root key %t\n", addr, st.GetId(),
			strings.TrimPrefix(st.GetState().String(), "REPLICA_STATE_"), st.GetLeaderId(), st.GetLeaderApiAddress(), st.GetTerm(),
			st.GetCommitIndex(), st.GetAppliedIndex(), st.GetLastSnapshotIndex(), st.GetHasRootKey())
		if st.GetNotReadyReason() != "" {
			fmt.Fprintf(stdout, "  not ready: %s\n", st.GetNotReadyReason())
		}
		return nil
	})
	if !o.json && len(all) > 0 {
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "MEMBER\tSUFFRAGE\tRAFT ADDRESS\tAPI ADDRESS")
		for _, m := range all[0].GetMembers() {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.GetId(), strings.TrimPrefix(m.GetSuffrage().String(), "SUFFRAGE_"), m.GetAddress(), m.GetApiAddress())
		}
		tw.Flush()
	}
	return err
}

func clusterAdd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("cluster add", stderr, withJSON)
	var id, addr, api string
	var nonvoter bool
	fs.StringVar(&id, "id", "", "the server's Raft ID (required)")
	fs.StringVar(&addr, "address", "", "its Raft transport address host:port (required)")
	fs.StringVar(&api, "api-address", "", "its API address host:port")
	fs.BoolVar(&nonvoter, "nonvoter", false, "add a non-voting read replica")
	if err := parse(fs, args); err != nil {
		return err
	}
	if id == "" || addr == "" {
		return usageError(fs, "--id and --address are required")
	}
	suffrage := rootkmsv1.Suffrage_SUFFRAGE_VOTER
	if nonvoter {
		suffrage = rootkmsv1.Suffrage_SUFFRAGE_NONVOTER
	}
	return clusterWrite(ctx, o, stdout, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ClusterStatus, error) {
		return c.Join(ctx, &rootkmsv1.JoinRequest{Id: id, Address: addr, Suffrage: suffrage, ApiAddress: api})
	}, "added "+id)
}

func clusterRemove(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("cluster remove", stderr, withJSON)
	var id string
	fs.StringVar(&id, "id", "", "the server's Raft ID (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if id == "" {
		return usageError(fs, "--id is required")
	}
	return clusterWrite(ctx, o, stdout, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ClusterStatus, error) {
		return c.Remove(ctx, &rootkmsv1.RemoveRequest{Id: id})
	}, "removed "+id)
}

func clusterWrite(ctx context.Context, o *options, stdout io.Writer, call func(context.Context, rootkmsv1.RootKMSClient) (*rootkmsv1.ClusterStatus, error), done string) error {
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	st, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ClusterStatus, error) {
		return call(ctx, c)
	})
	if err != nil {
		return refused(err)
	}
	if o.json {
		return printJSON(stdout, st)
	}
	fmt.Fprintf(stdout, "%s; members:\n", done)
	for _, m := range st.GetMembers() {
		fmt.Fprintf(stdout, "  %s %s %s %s\n", m.GetId(), strings.TrimPrefix(m.GetSuffrage().String(), "SUFFRAGE_"), m.GetAddress(), m.GetApiAddress())
	}
	return nil
}

func clusterSnapshot(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("cluster snapshot", stderr, 0)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	return eachReplica(ctx, o, func(ctx context.Context, addr string, c rootkmsv1.RootKMSClient) error {
		resp, err := c.Snapshot(ctx, &rootkmsv1.SnapshotRequest{})
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: snapshot at index %d, term %d\n", addr, resp.GetIndex(), resp.GetTerm())
		return nil
	})
}
