package cli

import (
	"context"
	"time"

	"github.com/cairnkms/cairn/internal/identity"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
)

// ProbeRecords runs the golden-probe gate as a rollout would: probeServers
// over servers with the golden ciphertexts goldenProbes takes from records.
// It returns each failing server's failures as text, by address.
func ProbeRecords(ctx context.Context, src *identity.Source, servers map[string][]string, records []*statev1.KeysetRecord, timeout time.Duration) (map[string][]string, error) {
	probes := map[string][]goldenProbe{}
	for region := range servers {
		probes[region], _ = goldenProbes(records, region)
	}
	failures, err := probeServers(ctx, src, servers, probes, timeout)
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for addr, fs := range failures {
		for _, f := range fs {
			out[addr] = append(out[addr], f.String())
		}
	}
	return out, nil
}
