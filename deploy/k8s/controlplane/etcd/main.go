// Command etcd runs a single-member etcd for the loopback test control plane (make k8s-test).
//
// It embeds go.etcd.io/etcd/server/v3 rather than building upstream's etcd main so that the
// version is the one k8s.io/kubernetes v1.37.2 requires (one go.mod, one go.sum), and the flags
// are only the few a throwaway loopback store needs. Data is not fsynced: the store lives only
// as long as one test run.
package main

import (
	"flag"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func mustURL(raw string) url.URL {
	parsed, err := url.Parse(raw)
	if err != nil {
		log.Fatalf("etcd: invalid url %q: %v", raw, err)
	}
	return *parsed
}

func main() {
	dataDir := flag.String("data-dir", "", "directory for the member's data (required)")
	clientURL := flag.String("listen-client-url", "http://127.0.0.1:2379", "client URL (loopback)")
	peerURL := flag.String("listen-peer-url", "http://127.0.0.1:2380", "peer URL (loopback)")
	flag.Parse()
	if *dataDir == "" {
		log.Fatal("etcd: --data-dir is required")
	}

	cfg := embed.NewConfig()
	cfg.Name = "k8s-test"
	cfg.Dir = *dataDir
	cfg.LogLevel = "warn"
	cfg.UnsafeNoFsync = true
	cfg.ListenClientUrls = []url.URL{mustURL(*clientURL)}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = []url.URL{mustURL(*peerURL)}
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: failed to start: %v", err)
	}
	defer server.Close()

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-server.Server.ReadyNotify():
		log.Printf("etcd: ready on %s", *clientURL)
	case sig := <-signals:
		log.Printf("etcd: %v before ready, stopping", sig)
		return
	}
	select {
	case err := <-server.Err():
		log.Fatalf("etcd: stopped: %v", err)
	case sig := <-signals:
		log.Printf("etcd: %v, stopping", sig)
	}
}
