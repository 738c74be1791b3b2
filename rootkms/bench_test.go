package rootkms_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// BenchmarkUnwrapRegionKey measures UnwrapRegionKey from one replica over
// mTLS (local state, RMK unwrap, HPKE seal; the client opens the reply), at
// 1 and 16 concurrent callers.
func BenchmarkUnwrapRegionKey(b *testing.B) {
	c := newChain(b)
	r := c.startReplica("rootkms-1", true, false)
	if err := r.srv.WaitReady(bg(b)); err != nil {
		b.Fatal(err)
	}
	createRegion(b, c.client(regionctlID, r.api), "us-east")
	conn, err := grpc.NewClient(r.api, grpc.WithTransportCredentials(c.pki.ClientCredentials(kmsEast)))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	client := rootkmsv1.NewRootKMSClient(conn)
	info, _ := hpkeseal.Info("cairn/rootkms/v1/region-key", "us-east", kmsEast)
	unwrap := func() error {
		rcp, err := hpkeseal.NewRecipient()
		if err != nil {
			return err
		}
		defer rcp.Close()
		resp, err := client.UnwrapRegionKey(context.Background(), &rootkmsv1.UnwrapRegionKeyRequest{Region: "us-east", Recipient: rcp.PublicKey()})
		if err != nil {
			return err
		}
		k, err := rcp.Open(resp.GetSealedKeys(), info)
		k.Wipe()
		return err
	}
	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			var next atomic.Int64
			var wg sync.WaitGroup
			for range callers {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if err := unwrap(); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "unwraps/s")
		})
	}
}

// BenchmarkWrite measures a Raft write end to end (RotateRegionKey through
// the leader of a 3-voter cluster on loopback: barrier, new key, RMK wrap,
// replicated and fsynced apply) and reports p50 and p99 latency.
func BenchmarkWrite(b *testing.B) {
	c := newChain(b)
	r1 := c.startReplica("rootkms-1", true, false)
	r2 := c.startReplica("rootkms-2", false, false, r1.api)
	r3 := c.startReplica("rootkms-3", false, false, r1.api)
	for _, r := range []*replica{r1, r2, r3} {
		if err := r.srv.WaitReady(bg(b)); err != nil {
			b.Fatal(err)
		}
	}
	admin := c.client(regionctlID, r1.api, r2.api, r3.api)
	createRegion(b, admin, "us-east")
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		if err := admin.Do(context.Background(), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

// BenchmarkFailover measures, per iteration, the time from stopping the
// leader of a 3-voter cluster (election and heartbeat timeouts 200 ms) to
// the next acknowledged write through the survivors.
func BenchmarkFailover(b *testing.B) {
	var total time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c := newChain(b)
		rs := []*replica{c.startReplica("rootkms-1", true, false)}
		rs = append(rs, c.startReplica("rootkms-2", false, false, rs[0].api), c.startReplica("rootkms-3", false, false, rs[0].api))
		for _, r := range rs {
			if err := r.srv.WaitReady(bg(b)); err != nil {
				b.Fatal(err)
			}
		}
		waitVoters(b, rs[0], 3)
		admin := c.client(regionctlID, addrs(rs)...)
		createRegion(b, admin, "us-east")
		var leader *replica
		for _, r := range rs {
			if r.srv.Raft().State() == raft.Leader {
				leader = r
			}
		}
		b.StartTimer()
		start := time.Now()
		leader.stop()
		for {
			err := admin.Do(bg(b), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
				ctx, cancel := context.WithTimeout(ctx, time.Second)
				defer cancel()
				_, err := cl.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
				return err
			})
			if err == nil {
				break
			}
			if time.Since(start) > 20*time.Second {
				b.Fatalf("no write acknowledged 20 s after the leader stopped: %v", err)
			}
		}
		total += time.Since(start)
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms-to-next-write")
}

func waitVoters(tb testing.TB, r *replica, n int) {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		f := r.srv.Raft().GetConfiguration()
		if f.Error() == nil && len(f.Configuration().Servers) == n {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("cluster never reached %d members", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
