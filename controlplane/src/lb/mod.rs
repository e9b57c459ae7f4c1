//! The SIP load balancer (`hasp lb`): stateless forwarding to the live proxies that
//! membership lists (to come).
