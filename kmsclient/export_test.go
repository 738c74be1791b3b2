package kmsclient

import (
	"context"
	"time"

	"google.golang.org/grpc"
)

// Test hooks, exported to the kmsclient_test package only.

// WithDialOptions adds gRPC dial options (tests count attempts with an
// interceptor).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, opts...) }
}

// WithSleep replaces the backoff sleep (tests record the pauses).
func WithSleep(f func(ctx context.Context, d time.Duration) error) Option {
	return func(o *options) { o.sleep = f }
}

// SleepContext is the default backoff sleep.
var SleepContext = sleepContext

// BackoffCeiling and FullJitter expose the backoff computation.
var (
	BackoffCeiling = backoffCeiling
	FullJitter     = fullJitter
)
