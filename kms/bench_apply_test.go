package kms_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// BenchmarkApplied is BenchmarkReady's memory figure in the steady state
// after a rollout: a server boots from a persisted bundle of 10k or 100k
// keysets (serial 1), then a second bundle of the same keysets (serial 2)
// is applied over KMSAdmin, so that the server has a previous bundle as
// well as the one it serves. It reports, once the history is flushed after
// the second swap (medians of at least five runs):
//
//   - RSS-bytes/keyset: the growth of the process's VmRSS from before
//     kms.New, divided by the number of keysets (target: at most 2048);
//   - heap-bytes/keyset: that of the live Go heap;
//   - ms-apply: the ApplyBundle call of the second bundle.
//
// The signed bundles the benchmark pushes are live before and after, so they
// are not counted. B/op and allocs/op are those of one boot and apply.
func BenchmarkApplied(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("keysets=%d", n), func(b *testing.B) { benchApplied(b, n) })
	}
}

func benchApplied(b *testing.B, n int) {
	w := newBenchWorld(b)
	acl := kmstest.ACL("client/us-east/app")
	kss := make([]*kmstest.Keyset, n)
	for i := range kss {
		kss[i] = kmstest.NewKeyset(b, fmt.Sprintf("t%03d/keyset-%06d", i/1000, i), acl)
	}
	first := w.signer.Sign(b, kmstest.Bundle(b, w.keys, region, 1, kss...))
	second := w.signer.Sign(b, kmstest.Bundle(b, w.keys, region, 2, kss...))
	firstFile, err := encodeSigned(first)
	if err != nil {
		b.Fatal(err)
	}
	history := usageHistory(kss)
	kss = nil // only the signed bundles stay live: they are in both samples
	alog := openAudit(b)
	var (
		apply     []time.Duration
		rss, heap []float64 // growth per keyset
	)
	run := func(timed bool) {
		b.StopTimer()
		dir := b.TempDir()
		for name, data := range map[string][]byte{kms.BundleFile: firstFile, kms.UsageFile: history} {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
				b.Fatal(err)
			}
		}
		cfg := w.config(b, dir, w.pki.Source(kms1ID), alog)
		cfg.MaxInFlight = 0 // the server's default, as in BenchmarkReady
		flushed := statUsageFile(b, dir)
		before := sampleMemory(b)
		if timed {
			b.StartTimer()
		}

		srv, addr := startKMS(b, cfg)
		awaitFlushed(b, dir, flushed)
		flushed = statUsageFile(b, dir)
		cc := w.dial(b, kmstest.CreatedBy, addr)
		start := time.Now()
		_, err := kmsv1.NewKMSAdminClient(cc).ApplyBundle(b.Context(), &kmsv1.ApplyBundleRequest{Bundle: second})
		apply = append(apply, time.Since(start))
		if err != nil {
			b.Fatalf("ApplyBundle(serial 2) = %v", err)
		}
		cc.Close() // its buffers are the client's, not the server's

		b.StopTimer()
		awaitFlushed(b, dir, flushed)
		loaded := sampleMemory(b)
		srv.Close()
		if err := os.RemoveAll(dir); err != nil { // two bundle files: do not pile them up
			b.Fatal(err)
		}
		rss = append(rss, (float64(loaded.rss)-float64(before.rss))/float64(n))
		heap = append(heap, (float64(loaded.heap)-float64(before.heap))/float64(n))
		if timed {
			b.StartTimer()
		}
	}
	for b.Loop() {
		run(true)
	}
	for len(rss) < minBoots {
		run(false)
	}
	runtime.KeepAlive(first)
	runtime.KeepAlive(second)
	b.ReportMetric(median(apply).Seconds()*1e3, "ms-apply")
	b.ReportMetric(median(rss), "RSS-bytes/keyset")
	b.ReportMetric(median(heap), "heap-bytes/keyset")
}

// encodeSigned encodes sb as ApplyBundle persists it.
func encodeSigned(sb *bundlev1.SignedBundle) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(sb)
}

// usageHistory is a history in which every keyset's primary was used a
// minute ago, as a busy server leaves behind (as persistMany writes it).
func usageHistory(kss []*kmstest.Keyset) []byte {
	var h bytes.Buffer
	h.WriteString("cairn-kms-usage 1\n")
	used := time.Now().Add(-time.Minute).UnixNano()
	for _, k := range kss {
		fmt.Fprintf(&h, "%s\t%d\t1\t%d\t10\t20\t%d\n", k.Name, k.Primary(), int64(kmstest.DefaultTTL), used)
	}
	return h.Bytes()
}
