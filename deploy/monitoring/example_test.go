package monitoring_test

import (
	"fmt"
	"strings"

	"github.com/cairnkms/cairn/deploy/monitoring"
)

// The alerts that page someone.
func ExampleRules() {
	rules, err := monitoring.Rules()
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, r := range rules {
		if r.Severity == "page" {
			fmt.Printf("%s (for %s)\n", r.Alert, r.For)
		}
	}
	// Output:
	// CairnKMSRegionUnavailable (for 2m0s)
	// CairnKMSDecryptErrorRatioHigh (for 10m0s)
	// CairnKMSEncryptErrorRatioHigh (for 10m0s)
	// CairnRootKMSNoLeader (for 1m0s)
	// CairnDistributorAllSealed (for 1m0s)
	// CairnDistributorLastUnsealed (for 10m0s)
}

// The root KMS metrics the rules and the dashboard query, as a scrape of a
// replica's /metrics must show them (histograms as NAME_bucket).
func ExampleMetricNames() {
	names, err := monitoring.MetricNames()
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, n := range names {
		if strings.HasPrefix(n, "cairn_rootkms_") {
			fmt.Println(n)
		}
	}
	// Output:
	// cairn_rootkms_apply_duration_seconds_bucket
	// cairn_rootkms_keysets
	// cairn_rootkms_raft_applied_index
	// cairn_rootkms_raft_commit_index
	// cairn_rootkms_raft_has_leader
	// cairn_rootkms_raft_last_contact_seconds
	// cairn_rootkms_raft_leader
	// cairn_rootkms_raft_term
	// cairn_rootkms_ready
	// cairn_rootkms_regions
	// cairn_rootkms_snapshot_age_seconds
}
