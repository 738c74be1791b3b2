package rollout_test

import (
	"fmt"
	"time"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

func ExampleNext() {
	now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	plan, err := rollout.NewPlan(rollout.Change{
		Bundles: []rollout.BundleRef{
			{Region: "us-east", Serial: 8, SHA256: "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"},
			{Region: "eu-west", Serial: 5, SHA256: "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"},
		},
		By: "alice", Why: "add demo/notes version 3",
	}, map[string][]string{"us-east": {"kms-1", "kms-2"}, "eu-west": {"kms-3"}},
		rollout.Options{Regions: []string{"us-east", "eu-west"}})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(plan) // printed before anything is applied
	rec := rollout.NewRecord("r1", plan, "ctl-1", 1, now)
	rec, actions, err := rollout.Next(rec, rollout.Started{Epoch: 1}, now)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, a := range actions {
		fmt.Println(a)
	}
	fmt.Println(rec.Phase)
	// Output:
	// rollout by alice: add demo/notes version 3
	//   bundles: us-east serial 8 sha256 0a0a0a0a0a0a; eu-west serial 5 sha256 0b0b0b0b0b0b
	//   stage 1/3 canary: us-east [kms-1]; bake 10m0s
	//   stage 2/3 region us-east: us-east [kms-2]; bake 30m0s
	//   stage 3/3 wave 1: eu-west [kms-3]; bake 1h0m0s
	//   gates: every server ready; error rate up by at most 0.001; p99 at most 1.5x max(before, 5ms); every golden probe decrypts
	// report: rollout r1 by alice started: add demo/notes version 3
	// report: stage 1/3 canary: us-east [kms-1]
	// dry-run stage=1 us-east [kms-1] bundle us-east serial 8 sha256 0a0a0a0a0a0a
	// dry-run
}
